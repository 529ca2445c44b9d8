"""Data-parallel zeroth-order training: every rank draws the same z and only loss scalars cross the network.

With ``ZOSGD(..., process_group=group)`` each rank runs the closure on its own shard of the batch; the
losses L+ and L- are averaged over the group's ranks before the projected gradient is formed, so every
rank applies the identical update and no parameter or gradient is communicated. That holds only if
every rank draws the same directions: on its first step each process checks, with one small all-reduce,
that all ranks share the base seed, the step counter, q and the distribution, and names the difference.

The group is a ``torch.distributed`` process group, ``True`` for the default group, or a 1-D
``DeviceMesh`` (FSDP2's; :func:`zo2.attach_fsdp` picks it from the sharded model when none is given).

Launch (one process per GPU, or per CPU socket with gloo):

    torchrun --nproc_per_node=4 train.py     # in train.py: dist.init_process_group(); ZOSGD(..., process_group=True)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_group(process_group: object) -> dist.ProcessGroup | None:
    """The process group behind ZOSGD's ``process_group`` argument (None: the default group)."""
    if process_group is True:
        return None
    if not dist.is_available():
        raise RuntimeError("ZOSGD: process_group was given but this torch has no torch.distributed")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"ZOSGD: process_group is the {process_group.ndim}-D mesh {process_group}; pass a 1-D "
                             "mesh or the process group of all data-parallel ranks")
        return process_group.get_group()
    raise TypeError(f"ZOSGD: process_group must be a torch.distributed process group, a 1-D DeviceMesh or True "
                    f"(the default group), got {type(process_group).__name__}")


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


def check_same_run(seed: int, step: int, num_perturbations: int, distribution: str,
                   group: dist.ProcessGroup | None) -> None:
    """Raise on every rank if the ranks would draw different directions (seed, step, q or distribution differ)."""
    if not dist.is_available() or not dist.is_initialized():
        average_losses([0.0], group)  # raises the not-initialised error
    fields = {"seed": seed % 2**63, "step": step, "num_perturbations": num_perturbations,
              "distribution": 0 if distribution == "normal" else 1}
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=_reduce_device(group))
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    differ = [name for name, a, b in zip(fields, lo.tolist(), hi.tolist(), strict=True) if a != b]
    if differ:
        raise RuntimeError(
            f"ZOSGD: the data-parallel ranks disagree on {differ} (this rank: "
            f"{ {k: fields[k] for k in differ} }); every rank must draw the same directions to apply the same "
            "update. Give all ranks the same ZOSGD(seed=...) and options, and resume all of them from the same "
            "checkpoint")
