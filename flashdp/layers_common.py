"""What every DP layer does around its computation, in one helper: :func:`layer_call`.

A DP layer's forward asks ``call = flashdp.layer_call(self, x)``. That does the bookkeeping every
layer needs, so a layer author cannot forget part of it:

1. the will-backward check: ``None`` when no trainable parameter of the layer takes part in a backward
   pass (grad mode off, or everything frozen); run the plain forward then;
2. the batch-dimension check (inputs must be batch-first), with an error naming the layer;
3. ``note_forward(call)`` on the layer's clip group, so a group used several times (tied weights, a module
   called twice) waits for all its uses before clipping; skipping it would silently clip each use alone;
4. the number of samples in the input (a flat input of k·B rows under a model batch of B is the batch
   flattened sample-major; a sequence-first or any other input whose dim 0 is not B is refused), and the
   layer's name for messages.

The layer passes ``call`` to its autograd Function; in backward it hands the clip group its
:class:`~flashdp.groups.Use` with ``call.add_use(use)`` and reshapes tensors per sample with
``call.flatten(t)``. A complete example is in docs/flashdp.md ("Adding a layer").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import dispatch
from .errors import FlashDPError
from .groups import ClipGroup, Use

__all__ = ["LayerCall", "autocast_inputs", "dp_group", "flatten_batch", "in_replay", "layer_call", "replaying",
           "trainable"]

_replay = threading.local()


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Inside: every DP layer runs its plain forward (the generic fallback's per-sample replay of a module
    that contains DP layers: their own clipping happens in the real backward, not in the replay)."""
    _replay.depth = getattr(_replay, "depth", 0) + 1
    try:
        yield
    finally:
        _replay.depth -= 1


def in_replay() -> bool:
    """Whether this thread is inside :func:`replaying`."""
    return getattr(_replay, "depth", 0) > 0


def flatten_batch(t: Tensor, where: str, min_dim: int = 2, batch: int | None = None) -> Tensor:
    """(B, *, d) → (B, T, d) with T the product of the middle dims (``batch`` samples if given, see
    :meth:`flashdp.runtime.Runtime.sample_count`); refuse inputs without a batch dim."""
    if t.dim() < min_dim:
        raise _no_batch_dim(t, where)
    B = t.shape[0] if batch is None else batch
    d = t.shape[-1]
    return t.reshape(B, t.numel() // (B * d) if B * d else 0, d)


def _no_batch_dim(t: Tensor, where: str) -> FlashDPError:
    return FlashDPError(
        f"flashdp: {where} got an input of shape {tuple(t.shape)} without a batch dimension. DP layers need "
        "batch-first inputs (B, ..., features) so that each sample's gradient can be clipped; add the batch "
        "dimension (e.g. x.unsqueeze(0))."
    )


def _check_flattened_batch(x: Tensor, min_dim: int, batch: int, where: str) -> None:
    """Refuse an input whose dim 0 is not the model's batch unless it is the batch flattened into rows.

    Only an input with no dim to spare (``x.dim() == min_dim``: a Linear's (rows, d)) can be the batch flattened
    sample-major (``x.reshape(-1, d)`` of a batch-first tensor, as OPT's decoder layers do). Anything with more
    dims and another dim 0 (a sequence-first (T, B, d) tensor, whatever T is) is refused, and so is a flattened
    view whose base tensor has another dim 0: a layout is never guessed from a row count, since clipping rows of
    several samples together breaks the per-sample bound.
    """
    base = x._base
    if x.dim() > min_dim:
        found = f"an input of shape {tuple(x.shape)}"
    elif base is not None and base.dim() > min_dim and base.shape[0] != batch:
        found = f"a view of shape {tuple(x.shape)} of a tensor of shape {tuple(base.shape)}"
    else:
        return
    raise FlashDPError(
        f"flashdp: {where} got {found} while the model's batch has {batch} samples; dim 0 of every DP layer's "
        "input must be the sample dimension. Sequence-first (T, B, ...) inputs are refused, never clipped: use "
        "batch_first=True or x.transpose(0, 1); a flattened batch must be x.reshape(-1, d) of a batch-first "
        "tensor.")


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device (as F.linear would).

    Raises:
        FlashDPError: the tensors are on different devices (a model on one device, its input on another).
    """
    present = [t for t in tensors if t is not None]
    first = present[0]
    other = next((t for t in present[1:] if t.device != first.device), None)
    if other is not None:
        raise FlashDPError(
            f"flashdp: the layer's input is on {first.device} and its parameters on {other.device}; move the "
            f"input to the model's device (x.to({str(other.device)!r})) or the model to the input's.")
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def trainable(p: Tensor | None) -> bool:
    return p is not None and p.requires_grad


def dp_group(module: nn.Module) -> ClipGroup:
    """The clip group ``make_private`` gave ``module``."""
    group = module.__dict__.get("_flashdp_group")
    if group is None:
        raise FlashDPError(f"flashdp: {type(module).__name__} has no clip group; convert it with flashdp.make_private")
    return group


@dataclass(eq=False)
class LayerCall:
    """One forward call of a DP layer that will take part in a backward pass (see :func:`layer_call`).

    Attributes:
        group: the layer's clip group.
        name: the layer's path in the model (for messages).
        batch_size: the number of samples in this call's input.
        broadcast: the input has one row in dim 0 under a larger model batch (an input broadcast over the
            batch, like GPT-2's ``position_ids``); the layer must expand it to ``batch_size`` rows so that each
            sample keeps its own gradient (only when ``layer_call(..., allow_broadcast=True)``).
    """

    group: ClipGroup
    name: str
    batch_size: int
    broadcast: bool = False
    forced_path: Any = dispatch.UNSET  # a dispatch.force_path in effect during forward

    def flatten(self, t: Tensor) -> Tensor:
        """(B, *, d) → (B, T, d) with B = ``batch_size``: the per-sample rows of an input or output gradient."""
        return flatten_batch(t, self.name, min_dim=1, batch=self.batch_size)

    def add_use(self, use: Use) -> None:
        """From the layer's backward: hand ``use`` to the clip group (clipped now, or with the group's other uses)."""
        self.group.add_use(use, self.name, self)

    def scratch(self) -> dict[str, Any]:
        """From backward: a dict shared by the model's layers for the running backward pass (caches)."""
        return self.group.runtime.scratch(self.batch_size, self.name)


def layer_call(module: nn.Module, x: Tensor, params: tuple[Tensor | None, ...] | None = None, *,
               min_dim: int = 2, allow_broadcast: bool = False) -> LayerCall | None:
    """Start a forward call of a DP layer; ``None`` when it takes no part in a backward pass.

    Args:
        module: the DP layer (converted by ``make_private``).
        x: the layer's input; dim 0 is the sample dimension.
        params: the parameters this call uses (default: the module's own parameters).
        min_dim: the smallest ``x.dim()`` that still has a batch dimension (2 for a Linear's (B, d) input;
            1 for an embedding's (B,) ids; ``1 + len(normalized_shape)`` for a norm).
        allow_broadcast: accept one row in dim 0 under a larger model batch (see ``LayerCall.broadcast``).

    Returns:
        ``None`` if grad mode is off, none of ``params`` is trainable, or a fallback replay is running (run the
        plain forward), else the
        :class:`LayerCall` to pass to the layer's autograd Function.

    Raises:
        FlashDPError: ``x`` has no batch dimension, or its dim 0 does not match the model's batch, or the
            module was not made private.
    """
    if params is None:
        params = tuple(module._parameters.values())
    if in_replay() or not (torch.is_grad_enabled() and any(trainable(p) for p in params)):
        return None
    where = module.__dict__.get("_flashdp_name", type(module).__name__)
    if x.dim() < min_dim:
        raise _no_batch_dim(x, where)
    group = dp_group(module)
    runtime = group.runtime
    lead = x.shape[0]
    model_batch = runtime.model_batch()
    broadcast = allow_broadcast and lead == 1 and model_batch is not None and model_batch > 1
    if not broadcast and model_batch and lead != model_batch:
        _check_flattened_batch(x, min_dim, model_batch, where)
    batch = model_batch if broadcast else runtime.sample_count(lead, where)
    call = LayerCall(group, where, batch, broadcast, dispatch.captured_override())
    group.note_forward(call)
    runtime.watch(module)
    return call
