"""ZOSGD over a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 replaces each parameter by a DTensor parameter whose local tensor holds a dim-0 chunk of the
unsharded weight (``torch.chunk`` semantics: the last chunks may be shorter or empty) and all-gathers
the chunks before each module's forward. A rank therefore perturbs and updates only its chunk, with z
drawn at the chunk's **global** element offset in the parameter's stream: the all-gathered weight is
then exactly the unsharded one's, and the trajectory that of one process.

Two FSDP2 behaviours would make a forward miss a pass, and :class:`FSDPSharding` undoes both before
every pass: the root module's parameters stay unsharded after a forward (FSDP2 keeps them for the
backward it expects), as do every module's with ``reshard_after_forward=False``; a later forward reuses
that unsharded copy instead of gathering the perturbed chunks. Resharding (``FSDPModule.reshard()``,
local, no communication) frees it, so the next forward all-gathers what the pass left.

Launch: ``fully_shard`` each block and then the root, build ``ZOSGD(model.parameters(), ...)`` after
that, and call :func:`attach_fsdp`; see docs/zo2_distributed.md.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from zo2.optimizer import ZOSGD

__all__ = ["FSDPSharding", "attach_fsdp", "is_sharded", "local_shard"]

OFFLOAD_AND_FSDP = ("zo2.offload's engine streams whole blocks through its own ring and hooks while FSDP2 owns "
                    "where each shard lives, so the two do not combine: keep FSDP2's shards on the host with "
                    "fully_shard(..., offload_policy=CPUOffloadPolicy()) instead (docs/zo2_distributed.md)")


def is_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor parameter (what ``fully_shard`` puts in the model). torch.distributed.tensor takes
    seconds to import and zo2 does not import it: until something has, no tensor can be a DTensor."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(p, dtensor)


def local_shard(p: torch.Tensor, name: str = "parameter") -> tuple[torch.Tensor, int]:
    """This rank's part of ``p`` and the index of its first element in the unsharded tensor's flat order.

    A plain tensor is its own part, at offset 0. A DTensor must be sharded along dim 0 only (``Shard(0)``
    on any mesh dimensions, ``Replicate()`` on the others, as FSDP2 and HSDP lay parameters out): its
    local chunk is then one contiguous run of the flat tensor. The chunk's place comes from the DTensor's
    own placement and mesh (the layout torch.distributed.checkpoint saves), not from an even division.
    """
    if not is_sharded(p):
        return p, 0
    from torch.distributed.tensor import Replicate, Shard

    bad = [pl for pl in p.placements if not (type(pl) is Replicate or (type(pl) is Shard and pl.dim == 0))]
    if bad:
        raise ValueError(f"zo2: {name} is a DTensor with placements {p.placements}; zo2 perturbs a shard at its "
                         "flat offset in the unsharded tensor, which needs dim-0 sharding (Shard(0) or "
                         "Replicate()). Use fully_shard without shard_placement_fn, or one returning Shard(0)")
    with torch.no_grad():
        local = p.to_local()
    (chunk,) = p.__create_chunk_list__()
    row = math.prod(p.shape[1:])
    if tuple(chunk.sizes) != tuple(local.shape) or any(chunk.offsets[1:]):
        raise RuntimeError(f"zo2: {name}'s local tensor has shape {tuple(local.shape)} but its placement says "
                           f"{tuple(chunk.sizes)} at {tuple(chunk.offsets)}; this torch lays DTensors out in a "
                           "way zo2 does not know")
    return local, int(chunk.offsets[0]) * row


def _fsdp_roots(modules: list[nn.Module]) -> list[nn.Module]:
    """The FSDP modules with no FSDP ancestor (each runs FSDP's root logic in its forward)."""
    inside: set[int] = set()
    for m in modules:
        inside.update(id(c) for c in m.modules() if c is not m)
    return [m for m in modules if id(m) not in inside]


@dataclass
class FSDPSharding:
    """The FSDP2 modules of a model trained by ZOSGD: resharded before every noise pass so that no
    forward reuses an unsharded copy from before the pass."""

    modules: list[nn.Module]
    roots: list[nn.Module]

    def reshard(self) -> None:
        for m in self.modules:
            m.reshard()

    def recover(self) -> None:
        """After an error inside a forward: reset FSDP2's per-iteration state (where torch has
        ``reset_iter_state``; 2.13 does) and reshard."""
        for root in self.roots:
            reset = getattr(root, "reset_iter_state", None)
            if reset is not None:
                try:
                    reset()
                except RuntimeError:  # not the module FSDP initialised as its root; the step's error is re-raised
                    pass
        self.reshard()


def _mesh_of(params: list[tuple[str, torch.Tensor]]) -> DeviceMesh:
    meshes = {p.device_mesh for _, p in params}
    if len(meshes) > 1:
        raise ValueError(f"zo2.attach_fsdp: the parameters are sharded over {len(meshes)} different device meshes "
                         f"({', '.join(str(m) for m in meshes)}); zo2 averages the losses over one data-parallel "
                         "mesh: shard every module over the same mesh")
    return meshes.pop()


def _data_parallel_group(mesh: DeviceMesh, given: object) -> object:
    """The group to average the losses over: ``given`` if set (checked against the mesh's size), else the
    mesh's group (a 1-D mesh), else the default group when the mesh spans every rank."""
    from zo2.distributed import resolve_group

    if given is not None:
        size = dist.get_world_size(resolve_group(given))
        if size != mesh.size():
            raise ValueError(f"zo2.attach_fsdp: ZOSGD's process_group has {size} ranks but the model is sharded over "
                             f"{mesh.size()} ranks ({mesh}); the losses must be averaged over the ranks that share "
                             "the model: pass process_group=None to use the mesh's group")
        return given
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return True
    raise ValueError(f"zo2.attach_fsdp: the model is sharded over the {mesh.ndim}-D mesh {mesh}, which does not span "
                     "every rank; pass ZOSGD(process_group=<the group of all its ranks>)")


def attach_fsdp(model: nn.Module, opt: ZOSGD) -> FSDPSharding:
    """Run ``opt``'s steps on ``model``, sharded with ``fully_shard``: each rank perturbs and updates its
    chunks, the losses are averaged over the data-parallel ranks in one all-reduce per step.

    Args:
        model: the model after ``fully_shard`` (per block, then the root).
        opt: a :class:`zo2.ZOSGD` built from ``model.parameters()`` **after** ``fully_shard``. Its
            ``process_group`` defaults to the mesh's group (a given one must have the mesh's size).

    Returns the :class:`FSDPSharding` the optimizer keeps. Raises if the model is not sharded, if ``opt``
    holds parameters the model no longer has (built before ``fully_shard``, which replaces every
    parameter), if a placement is not dim-0 sharding, or if ``opt`` runs through ``zo2.offload``.
    """
    from zo2.optimizer import ZOSGD  # here: zo2.optimizer imports this module

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError as e:  # torch without torch.distributed, or older than 2.6
        raise RuntimeError(f"zo2.attach_fsdp needs torch.distributed with FSDP2 (torch >= 2.6): {e}") from e
    if not isinstance(opt, ZOSGD):
        raise TypeError(f"zo2.attach_fsdp needs a zo2.ZOSGD optimizer, got {type(opt).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"zo2.attach_fsdp needs an nn.Module, got {type(model).__name__}")
    if opt.offload_engine is not None:
        raise RuntimeError(f"zo2.attach_fsdp: this optimizer runs through zo2.offload. {OFFLOAD_AND_FSDP}")
    if opt.sharding is not None:
        raise RuntimeError("zo2.attach_fsdp: this optimizer is already attached to an FSDP model")
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("zo2.attach_fsdp: the model has no fully_shard module; call fully_shard(block) for each "
                         "block and fully_shard(model) first, or use ZOSGD(process_group=...) alone for plain "
                         "data parallelism")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("zo2.attach_fsdp: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group (e.g. under torchrun) before fully_shard")
    sharding = FSDPSharding(modules, _fsdp_roots(modules))
    sharding.reshard()  # an earlier forward may have left the root unsharded: its parameters are then plain
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for index, (p, _) in enumerate(opt.unique_params()):
        if id(p) not in by_id:
            raise ValueError(
                f"zo2.attach_fsdp: ZOSGD's parameter {index} (shape {tuple(p.shape)}) is not a parameter of the "
                "model. fully_shard replaces every parameter by a sharded DTensor parameter, so an optimizer built "
                "before it holds the old, unsharded tensors, and one built after a forward may hold the root's "
                "unsharded parameters (FSDP2 keeps them registered until the next reshard): build "
                "ZOSGD(model.parameters(), ...) after fully_shard and before any forward, or after model.reshard()")
        local_shard(p, by_id[id(p)])  # refuses a placement zo2 cannot address
    sharded = [(n, p) for n, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        opt.process_group = _data_parallel_group(_mesh_of(sharded), opt.process_group)
    opt.attach_sharding(sharding)
    return sharding
