"""Data-parallel zeroth-order training: every rank draws the same z and only loss scalars cross the network.

With ``ZOSGD(..., process_group=group)`` each rank runs the closure on its own shard of the batch; the
losses L+ and L- are averaged over the group's ranks before the projected gradient is formed, so every
rank applies the identical update and no parameter or gradient is communicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_losses(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """The mean of ``values`` over the ranks of ``group`` (one all-reduce of len(values) float64 scalars)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ZOSGD: process_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group (e.g. under torchrun) before the first step")
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t /= dist.get_world_size(group)
    return t.tolist()
