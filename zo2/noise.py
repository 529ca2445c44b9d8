"""The one fused noise pass over a tensor (the seed schedule is :mod:`memtrain.seeds`).

Every direction z is a pure function of (step seed, parameter stream id, element index), so nothing
tensor-sized is stored: a step keeps its seeds, and every pass (perturb, flip, restore + update; see
:mod:`zo2.transitions`) is one call of :func:`apply_pass` per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memtrain.kernels.zo_perturb import zo_perturb_
from memtrain.seeds import MASK64, splitmix64, step_seed

__all__ = ["MASK64", "apply_pass", "splitmix64", "step_seed"]


def apply_pass(tensor: torch.Tensor, stream: int, seeds: Sequence[int], coefs: Sequence[float], decay: float,
               dist: str, offset: int = 0, cast: torch.Tensor | None = None) -> None:
    """``tensor <- tensor + Σ_j coefs[j] · z(seeds[j], stream, offset + i) + decay · tensor`` in one fused pass.

    Terms with a zero coefficient are dropped (no noise is generated for them), and a pass with no term
    and no decay does not touch the tensor. ``offset`` is the index of the tensor's first element in the
    parameter's stream (a shard or slice of a larger parameter draws its part of the same z). ``cast``:
    also store the result, rounded to nearest even, into this bfloat16/float16 tensor in the same pass.
    """
    live = [(s, a) for s, a in zip(seeds, coefs, strict=True) if a != 0.0]
    if cast is not None:  # AMP: the update and the low-precision copy in one pass
        zo_perturb_(tensor, [s for s, _ in live], [a for _, a in live], stream, decay, dist, offset, out=cast)
    elif live or decay != 0.0:
        where = {"offset": offset} if offset else {}  # zo_perturb_'s default is 0
        zo_perturb_(tensor, [s for s, _ in live], [a for _, a in live], stream, decay, dist, **where)
