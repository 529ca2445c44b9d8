"""Helpers shared by the DP layers: autocast handling, batch-first flattening, tracking of uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import FlashDPError
from .groups import ClipGroup

__all__ = ["autocast_inputs", "dp_group", "flatten_batch", "model_batch", "sample_count", "trainable",
           "will_backward"]

# Batch size of the private model's current forward, set by a pre-hook make_private puts on the root module.
_MODEL_BATCH: dict[str, int | None] = {"value": None}


def model_batch() -> int | None:
    """The batch size of the private model's forward now running (None outside one)."""
    return _MODEL_BATCH["value"]


def sample_count(lead: int, where: str) -> int:
    """Number of samples in a DP layer input whose dim 0 has size ``lead``.

    Inside a forward of the private model with batch B, an input of ``k·B`` rows is the batch flattened
    sample-major (``x.reshape(-1, d)`` of a (B, T, d) tensor, as OPT's decoder layers do): B samples of k rows.
    """
    B = _MODEL_BATCH["value"]
    if B is None or lead == B or B == 0:
        return lead
    if lead > B and lead % B == 0:
        return B
    raise FlashDPError(
        f"flashdp: {where} got an input with {lead} rows in dim 0 while the model's batch has {B} samples. flashdp "
        "takes dim 0 of every DP layer's input as the sample dimension (or the batch flattened sample-major): keep "
        "inputs batch-first (batch_first=True), and expand broadcast inputs to the batch."
    )


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device (as F.linear would)."""
    first = next(t for t in tensors if t is not None)
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def flatten_batch(t: Tensor, where: str, min_dim: int = 2, batch: int | None = None) -> Tensor:
    """(B, *, d) → (B, T, d) with T the product of the middle dims (``batch`` samples if given, see
    :func:`sample_count`); refuse inputs without a batch dim."""
    if t.dim() < min_dim:
        raise FlashDPError(
            f"flashdp: {where} got an input of shape {tuple(t.shape)} without a batch dimension. DP layers need "
            "batch-first inputs (B, ..., features) so that each sample's gradient can be clipped; add the batch "
            "dimension (e.g. x.unsqueeze(0))."
        )
    B = t.shape[0] if batch is None else batch
    d = t.shape[-1]
    return t.reshape(B, t.numel() // (B * d) if B * d else 0, d)


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
