"""Staging slots under AMP: the few host buffers that hold a block's low-precision wire copy in flight.

The low-precision copy of a block exists only between its host pass and its upload: the host pass
(update of the fp32 master fused with the cast) writes it into a staging slot just before the block
is uploaded from there, and the slot is written again only after that upload has finished. So host
memory under AMP is the fp32 master plus :func:`staging_slots` blocks in low precision (pinned on
CUDA, so the uploads are asynchronous), instead of a low-precision copy of the whole model.

Slots: one per upload that can be in flight (the device ring's ``prefetch + 1`` slots) and one for the
block being prepared, so the host thread can prepare the next block while the ring is full.
"""

from __future__ import annotations

import torch

from zo2.copy_executor import HostEvent
from zo2.ring import host_buffer


def staging_slots(prefetch: int) -> int:
    """Host staging slots for a device ring of ``prefetch + 1`` slots: the uploads in flight + the one
    being prepared."""
    return prefetch + 2


def wait_event(event: torch.cuda.Event | HostEvent | None) -> None:
    """Block the calling host thread until ``event`` (a copy's end) has happened; None: nothing to wait."""
    if event is None:
        return
    if isinstance(event, HostEvent):
        event.wait()
    else:
        event.synchronize()


class StagingRing:
    """``slots`` host buffers of ``nbytes`` each (pinned when ``pin``) and the upload last read from each.

    :meth:`acquire` returns a slot's buffer once the upload that last read it has finished (the slot-reuse
    wait); :meth:`uploaded` records the upload that reads it next. Slots are handed out by the caller (the
    streamer), in upload order.
    """

    def __init__(self, slots: int, nbytes: int, pin: bool) -> None:
        if slots < 1:
            raise ValueError(f"zo2 StagingRing: slots must be >= 1, got {slots}")
        self.buffers = [host_buffer(nbytes, pin) for _ in range(slots)]
        self._reads: list = [None] * slots  # the event ending the last upload from each slot

    @property
    def slots(self) -> int:
        return len(self.buffers)

    def acquire(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s buffer, after the upload that last read it has finished (may block)."""
        wait_event(self._reads[slot])
        self._reads[slot] = None
        return self.buffers[slot]

    def uploaded(self, slot: int, event: torch.cuda.Event | HostEvent | None) -> None:
        """An upload from ``slot`` was issued; ``event`` marks its end (None: it has already run)."""
        self._reads[slot] = event

    def synchronize(self) -> None:
        """Wait for every upload from the slots."""
        for slot in range(self.slots):
            wait_event(self._reads[slot])
            self._reads[slot] = None
