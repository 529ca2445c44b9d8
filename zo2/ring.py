"""Host storage of offloaded blocks and the ring of device block buffers they stream through.

Each block's parameters live in one flat host buffer (pinned on CUDA machines, allocated once), so an
upload or an offload is a single copy. The device holds ``slots`` preallocated flat buffers; a
resident block's parameters are views into its slot. On CUDA, uploads run on their own stream, offloads
on another, and the compute stream waits on CUDA events only: the host never synchronises in the steady
state. On CPU the same schedule runs with synchronous copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes: every tensor of a flat buffer starts on a 256-byte boundary


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class FlatLayout:
    """Byte offsets of a block's tensors in a flat buffer, for one dtype per tensor."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    offsets: list[int]
    nbytes: int

    @classmethod
    def of(cls, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> FlatLayout:
        offsets, pos = [], 0
        for t, dtype in zip(tensors, dtypes, strict=True):
            offsets.append(pos)
            pos = _aligned(pos + t.numel() * dtype.itemsize)
        return cls([t.shape for t in tensors], list(dtypes), offsets, pos)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of this layout as views into ``flat`` (a uint8 buffer of at least ``nbytes``)."""
        out = []
        for shape, dtype, off in zip(self.shapes, self.dtypes, self.offsets, strict=True):
            size = torch.Size(shape).numel() * dtype.itemsize
            out.append(flat[off:off + size].view(dtype).view(shape))
        return out


def wire_layout(params: list[torch.Tensor], amp_dtype: torch.dtype | None) -> FlatLayout:
    """The layout of a block as it crosses the bus: floating tensors in ``amp_dtype`` when given."""
    dtypes = [amp_dtype if amp_dtype is not None and p.is_floating_point() else p.dtype for p in params]
    return FlatLayout.of(params, dtypes)


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 host buffer, page-locked when ``pin`` (so that copies to the GPU are asynchronous)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class BlockStore:
    """A block's host storage: ``master`` (its parameters in their own dtype; the fp32 master under
    AMP) and ``wire`` (what crosses the bus: the master itself, or a low-precision copy under AMP)."""

    def __init__(self, block: nn.Module, amp_dtype: torch.dtype | None, pin: bool) -> None:
        self.params: list[nn.Parameter] = list(block.parameters())  # each tensor once, tied or not
        self.master_layout = FlatLayout.of(self.params, [p.dtype for p in self.params])
        self.master_flat = host_buffer(self.master_layout.nbytes, pin)
        self.master = self.master_layout.views(self.master_flat)
        with torch.no_grad():
            for view, p in zip(self.master, self.params, strict=True):
                view.copy_(p.data)
                p.data = view  # the original storage is freed here, one block at a time
        if amp_dtype is None:
            self.wire_layout, self.wire_flat, self.wire = self.master_layout, self.master_flat, self.master
        else:
            self.wire_layout = wire_layout(self.params, amp_dtype)
            self.wire_flat = host_buffer(self.wire_layout.nbytes, pin)
            self.wire = self.wire_layout.views(self.wire_flat)

    def fill_wire(self) -> None:
        """Under AMP: the low-precision copy of the master, ready to be uploaded."""
        if self.wire_flat is not self.master_flat:
            for w, m in zip(self.wire, self.master, strict=True):
                w.copy_(m)

    def attach(self, tensors: list[torch.Tensor]) -> None:
        """Point the block's parameters at ``tensors`` (device views while resident, master otherwise)."""
        for p, t in zip(self.params, tensors, strict=True):
            p.data = t


class Ring:
    """``slots`` preallocated device buffers and the copies in and out of them.

    The caller assigns slots round-robin; :meth:`upload` into a slot is ordered after the previous
    occupant's :meth:`release` (by stream order on CPU, by a CUDA event on the GPU).
    """

    def __init__(self, device: torch.device, slots: int, slot_bytes: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        if self.cuda:
            self.upload_stream = torch.cuda.Stream(device)
            self.offload_stream = torch.cuda.Stream(device)
            self._uploaded = [torch.cuda.Event() for _ in range(slots)]
            self._freed: list[torch.cuda.Event | None] = [None] * slots

    @property
    def slots(self) -> int:
        return len(self.buffers)

    def upload(self, slot: int, source: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Copy the flat host buffer ``source`` into ``slot`` (asynchronously on CUDA), after the slot's
        previous occupant has left it and after ``after`` (the offload that last wrote ``source``)."""
        n = source.numel()
        if not self.cuda:
            self.buffers[slot][:n].copy_(source)
            return
        with torch.cuda.stream(self.upload_stream):
            if self._freed[slot] is not None:
                self.upload_stream.wait_event(self._freed[slot])
            if after is not None:
                self.upload_stream.wait_event(after)
            self.buffers[slot][:n].copy_(source, non_blocking=True)
            self._uploaded[slot].record(self.upload_stream)

    def wait_uploaded(self, slot: int) -> None:
        """Order the current (compute) stream after the upload into ``slot``."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._uploaded[slot])

    def release(self, slot: int, destination: torch.Tensor | None) -> torch.cuda.Event | None:
        """Free ``slot`` after the compute issued so far; copy it back into ``destination`` first if given.
        Returns the CUDA event that marks the end of that copy (None on CPU)."""
        if not self.cuda:
            if destination is not None:
                destination.copy_(self.buffers[slot][:destination.numel()])
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.offload_stream):
            self.offload_stream.wait_event(done)
            if destination is not None:
                destination.copy_(self.buffers[slot][:destination.numel()], non_blocking=True)
            freed = torch.cuda.Event()
            freed.record(self.offload_stream)
        self._freed[slot] = freed
        return freed

    def synchronize(self) -> None:
        """Wait for every copy in flight (before the host reads or writes the host store)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
