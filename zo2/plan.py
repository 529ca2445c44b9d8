"""The memory plan of an offloaded model: what stays on the device, the ring, the host store.

Peak device memory of a step = resident modules + ring + the activations of one block for every
half (2q of them) + the logits of each half. The plan is printed by ``zo2.offload`` and checked
against the free device and host memory before anything is moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1024**3


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class OffloadPlan:
    """Byte counts of an offloaded model (``block_bytes``: the largest block as it crosses the bus)."""

    device: str
    amp: str | None
    num_blocks: int
    block_bytes: int
    ring_slots: int
    ring_bytes: int
    resident_bytes: int
    host_bytes: int
    num_halves: int
    hidden_size: int | None = None
    vocab_size: int | None = None
    compute_itemsize: int = 4

    @property
    def device_bytes(self) -> int:
        """Resident modules + ring: the device memory held before any activation."""
        return self.resident_bytes + self.ring_bytes

    def activation_bytes(self, batch: int, seq_len: int) -> int:
        """An estimate of one step's activations: per half, a block's working set (hidden state, residual,
        attention and MLP intermediates: about 16 hidden-sized tensors) and the fp32 logits."""
        if self.hidden_size is None:
            return 0
        tokens = batch * seq_len
        block = 16 * tokens * self.hidden_size * self.compute_itemsize
        logits = tokens * (self.vocab_size or 0) * 4
        return self.num_halves * (block + logits)

    def __str__(self) -> str:
        lines = [
            f"zo2.offload plan ({self.device}, amp={self.amp}, {self.num_halves} halves per step):",
            f"  resident on device     {_fmt(self.resident_bytes):>12}  (embeddings, final norm, head, buffers)",
            f"  ring on device         {_fmt(self.ring_bytes):>12}  "
            f"({self.ring_slots} slots x {_fmt(self.block_bytes)})",
            f"  host store             {_fmt(self.host_bytes):>12}  ({self.num_blocks} blocks"
            + (", fp32 master + low-precision copy)" if self.amp else ")"),
        ]
        if self.hidden_size is not None:
            lines.append(f"  + activations, e.g. B=1 T=2048: {_fmt(self.activation_bytes(1, 2048))}")
        return "\n".join(lines)


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(plan: OffloadPlan, device: torch.device, extra_host_bytes: int) -> None:
    """Raise, printing the plan and what would fit, if the device or the host lacks the memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if plan.device_bytes > free:
            spare = free - plan.resident_bytes
            slots = max(spare // max(plan.block_bytes, 1), 0)
            fit = (f"a ring of {slots} slot(s) (prefetch={slots - 1}) would fit" if slots >= 1
                   else "even one slot does not fit beside the resident modules: free device memory or use amp='bf16'")
            raise MemoryError(f"zo2.offload: the plan needs {_fmt(plan.device_bytes)} on {device} but "
                              f"{_fmt(free)} is free; {fit}.\n{plan}")
    avail = available_host_bytes()
    if avail is not None and extra_host_bytes > avail:
        raise MemoryError(f"zo2.offload: the host store needs {_fmt(extra_host_bytes)} more host memory but "
                          f"{_fmt(avail)} is available; free host memory, or use amp=None (no low-precision "
                          f"copy).\n{plan}")
