"""Helpers shared by the DP layers: autocast handling, batch-first flattening, tracking of uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import FlashDPError
from .groups import ClipGroup

__all__ = ["autocast_inputs", "dp_group", "flatten_batch", "trainable", "will_backward"]


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device (as F.linear would)."""
    first = next(t for t in tensors if t is not None)
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def flatten_batch(t: Tensor, where: str, min_dim: int = 2) -> Tensor:
    """(B, *, d) → (B, T, d) with T the product of the middle dims; refuse inputs without a batch dim."""
    if t.dim() < min_dim:
        raise FlashDPError(
            f"flashdp: {where} got an input of shape {tuple(t.shape)} without a batch dimension. DP layers need "
            "batch-first inputs (B, ..., features) so that each sample's gradient can be clipped; add the batch "
            "dimension (e.g. x.unsqueeze(0))."
        )
    mid = 1
    for d in t.shape[1:-1]:
        mid *= d
    return t.reshape(t.shape[0], mid, t.shape[-1])


def trainable(p: Tensor | None) -> bool:
    return p is not None and p.requires_grad


def dp_group(module: nn.Module) -> ClipGroup:
    group = module.__dict__.get("_flashdp_group")
    if group is None:
        raise FlashDPError(f"flashdp: {type(module).__name__} has no clip group; convert it with flashdp.make_private")
    return group


def will_backward(*params: Tensor | None) -> bool:
    """Whether this forward builds a graph through any trainable parameter (counts as a use of the group)."""
    return torch.is_grad_enabled() and any(trainable(p) for p in params)
