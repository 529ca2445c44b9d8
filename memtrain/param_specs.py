"""Shapes and dtypes of an optimizer's parameters, saved in its state_dict and checked when it is loaded.

An optimizer state saved for another model can carry the same number of tensors and still not fit: ZO
optimizers keep no per-parameter state that torch would compare, and Adam's moments of other shapes load
and then fail inside the next step. A state_dict records each parameter's shape and dtype (plain lists and
strings, so ``torch.load(weights_only=True)`` reads it); loading compares them first and names the tensor
that differs before anything is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["check_moment_shapes", "check_param_specs", "param_specs"]


def param_specs(params: Sequence[torch.Tensor]) -> list[list]:
    """``[[shape as a list of ints, dtype name], ...]`` in the optimizer's parameter order."""
    return [[list(p.shape), str(p.dtype).removeprefix("torch.")] for p in params]


def _describe(index: int, p: torch.Tensor, name_of: Callable[[torch.Tensor], str | None] | None) -> str:
    name = name_of(p) if name_of is not None else None
    return f"parameter {index}" + (f" ({name})" if name else "")


def check_param_specs(saved: list, params: Sequence[torch.Tensor], where: str,
                      name_of: Callable[[torch.Tensor], str | None] | None = None) -> None:
    """Refuse a state saved for other parameters: another count, or a tensor of another shape or dtype."""
    if len(saved) != len(params):
        raise ValueError(f"{where}: the state was saved for {len(saved)} parameters but this optimizer has "
                         f"{len(params)}; load a state saved for this model")
    for i, ((shape, dtype), p) in enumerate(zip(saved, params, strict=True)):
        ours = param_specs([p])[0]
        if [list(shape), dtype] != ours:
            raise ValueError(f"{where}: {_describe(i, p, name_of)} is {ours[1]} of shape {tuple(ours[0])} here but "
                             f"{dtype} of shape {tuple(shape)} in the loaded state; it was saved for another model "
                             "(or another parameter order): load a state saved for this model")


def check_moment_shapes(state: dict, params: Sequence[torch.Tensor], where: str,
                        name_of: Callable[[torch.Tensor], str | None] | None = None) -> None:
    """For a torch optimizer state without specs: every per-parameter tensor of the parameter's rank
    (Adam's moments, SGD's momentum) must have the parameter's shape."""
    for i, p in enumerate(params):
        for key, value in state.get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() == p.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"{where}: the loaded {key!r} of {_describe(i, p, name_of)} has shape "
                                 f"{tuple(value.shape)} but the parameter {tuple(p.shape)}; the state was saved "
                                 "for another model: load a state saved for this model")
