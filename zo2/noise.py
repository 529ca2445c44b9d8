"""Seed schedule and the one fused noise pass over a tensor.

Every direction z is a pure function of (step seed, parameter stream id, element index), so nothing
tensor-sized is stored: a step keeps its seeds, and every pass (perturb, flip, restore + update; see
:mod:`zo2.transitions`) is one call of :func:`apply_pass` per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memtrain.kernels.zo_perturb import zo_perturb_

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al., OOPSLA'14): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, step: int, perturbation: int = 0) -> int:
    """The 64-bit Philox key of direction ``perturbation`` of step ``step`` (0-based) of a run."""
    return splitmix64(splitmix64(splitmix64(base_seed & MASK64) ^ step) ^ perturbation)


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
