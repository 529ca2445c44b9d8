"""flashdp under FSDP2 (``torch.distributed.fsdp.fully_shard``): what a sharded private model needs.

FSDP2 replaces each parameter by a sharded DTensor parameter (``Shard(0)``; ``(Replicate, Shard(0))`` for
HSDP) and, around each unit's forward and backward, swaps an all-gathered plain parameter in under the same
module attribute. flashdp's layers clip with whatever tensor the module holds when it runs, so the clipped
sum lands in the unsharded parameter's ``.grad``, which FSDP2's post-backward reduce-scatters. What this
module adds:

- :func:`configure` (run by the private model's root forward pre-hook and by ``DPOptimizer``, so
  ``make_private`` may come before or after ``fully_shard``): every FSDP2 unit reduces with a plain SUM
  (``set_gradient_divide_factor(1.0)`` with ``set_force_sum_reduction_for_comms(True)``; the factor covers
  the whole data-parallel group, so HSDP's all-reduce across replicas sums too) and reduce-scatters zeros for
  a parameter a rank did not use (so every rank issues the same collectives); it refuses a clip group whose
  modules sit in different units (a tied embedding and LM head must share one unit, e.g. the root);
- :func:`local_shard`: a gradient's local tensor and the global row-major offset of its first element,
  from the DTensor's mesh and placements (``torch.chunk`` semantics: an uneven last shard, possibly empty
  ones), so each rank adds exactly its part of the unsharded tensor's noise;
- :func:`all_ranks`: one all-reduce of a flag, so that every rank skips a non-finite step together.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import FlashDPError

if TYPE_CHECKING:
    from .privatize import PrivacyState

__all__ = ["all_ranks", "configure", "is_sharded", "local_shard", "units"]

_API = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "set_reduce_scatter_unused_params")


def _fsdp_module_class() -> type | None:
    """FSDP2's module class, or None when FSDP2 was never imported (then no module can be sharded with it; this
    keeps make_private and every forward from importing torch.distributed.fsdp, which takes about a second)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None)


def _dtensor_class() -> type | None:
    """The DTensor class, or None when torch.distributed.tensor was never imported (no tensor can be one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def units(model: nn.Module) -> dict[str, nn.Module]:
    """The FSDP2 units in ``model`` (modules ``fully_shard`` was applied to), by path."""
    cls = _fsdp_module_class()
    if cls is None:
        return {}
    return {path: m for path, m in model.named_modules() if isinstance(m, cls)}


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def configure(state: PrivacyState) -> None:
    """Make every FSDP2 unit of the private model sum the clipped sums; check the clip groups against the units.

    Cheap enough for every forward: a walk over the modules and a few attribute writes per unit.

    Raises:
        FlashDPError: a clip group's modules are in different FSDP2 units, or this torch's FSDP2 lacks the
            reduction settings flashdp needs.
    """
    model = state.model_ref()
    if model is None:
        return
    found = units(model)
    if not found:
        return
    for path, unit in found.items():
        missing = [name for name in _API if not hasattr(unit, name)]
        if missing:
            raise FlashDPError(
                f"flashdp: FSDP2 unit {path or type(unit).__name__!r} lacks {missing} in torch {torch.__version__}; "
                "flashdp needs them to make FSDP2 sum (not average) the clipped sums. Use torch >= 2.8.")
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_reduce_scatter_unused_params(True, recurse=False)
    state.runtime.sharded = True
    key = tuple(id(u) for u in found.values())
    if state.runtime.checked_units != key:
        _check_groups(state, model, list(found))
        state.runtime.checked_units = key


def _unit_of(path: str, unit_paths: list[str]) -> str | None:
    """The innermost unit containing the module at ``path`` (the one whose parameters FSDP2 gives it)."""
    best = None
    for u in unit_paths:
        if (u == "" or path == u or path.startswith(u + ".")) and (best is None or len(u) > len(best)):
            best = u
    return best


def _check_groups(state: PrivacyState, model: nn.Module, unit_paths: list[str]) -> None:
    path_of = {id(m): p for p, m in model.named_modules()}
    for group in state.groups:
        where = {path_of.get(id(m), "?"): _unit_of(path_of.get(id(m), "?"), unit_paths) for m, _ in group.modules()}
        if len(set(where.values())) > 1:
            shown = ", ".join(f"{p} in {('unit ' + repr(u or '<root>')) if u is not None else 'no unit'}"
                              for p, u in where.items())
            raise FlashDPError(
                f"flashdp: clip group {group.name!r} shares a parameter across FSDP2 units ({shown}). Its clipped sum "
                "is complete only after the group's last use, so all its modules must be in one unit: do not call "
                "fully_shard on a module holding only part of the group (for a tied embedding and LM head, shard the "
                "transformer blocks and then the root, which then owns both).")


def local_shard(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(local tensor, offset)``: the elements ``[offset, offset + local.numel())`` of the whole tensor, row-major.

    A plain tensor is its own shard at offset 0. A DTensor may be sharded along dim 0 only (FSDP2's default),
    over any number of mesh dims, and replicated over the others (HSDP); its offset comes from the mesh and
    placements (``torch.chunk`` semantics: uneven and empty shards are fine).

    Raises:
        FlashDPError: a DTensor sharded along another dim (its shard is not one row-major range) or partial.
    """
    if not is_sharded(t):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for pl in t.placements:
        if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)):
            raise FlashDPError(
                f"flashdp: a gradient of shape {tuple(t.shape)} has placements {t.placements}; flashdp adds noise "
                "to shards along dim 0 only (FSDP2's default Shard(0)). Do not pass shard_placement_fn to "
                "fully_shard, and do not combine flashdp with tensor parallelism.")
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local.shape) != tuple(shape):
        raise FlashDPError(f"flashdp: a DTensor's local tensor has shape {tuple(local.shape)}, its placements say "
                           f"{tuple(shape)} (padded shards are not supported)")
    row = math.prod(t.shape[1:]) if t.dim() > 0 else 1
    return local, (offset[0] * row if t.dim() > 0 else 0)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce of one integer)."""
    dist = torch.distributed
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0
