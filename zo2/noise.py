"""Seed schedule and fused noise passes over a parameter set.

Every direction z is a pure function of (step seed, parameter stream id, element index), so nothing
tensor-sized is stored: a step keeps its seeds, and any pass (perturb, flip, restore + update) calls
the fused kernel with the seeds and coefficients it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class NoiseTarget:
    """A tensor the noise passes update, with its stream id and its group's hyperparameters."""

    tensor: torch.Tensor
    stream: int
    group: dict


def apply_terms(
    targets: Sequence[NoiseTarget],
    seeds: Sequence[int],
    coef_fn: Callable[[dict], Sequence[float]],
    decay_fn: Callable[[dict], float] | None = None,
    dist: str = "normal",
) -> None:
    """One fused pass: for each target, ``p <- p + Σ_j coef_fn(group)[j] · z(seeds[j]) + decay_fn(group) · p``.

    Terms whose coefficient is zero are dropped (no noise is generated for them); a target with no
    term and no decay is not touched.
    """
    for target in targets:
        c = decay_fn(target.group) if decay_fn is not None else 0.0
        apply_pass(target.tensor, target.stream, seeds, coef_fn(target.group), c, dist)


def apply_pass(tensor: torch.Tensor, stream: int, seeds: Sequence[int], coefs: Sequence[float], decay: float,
               dist: str) -> None:
    """``tensor <- tensor + Σ_j coefs[j] · z(seeds[j]) + decay · tensor`` in one fused pass; terms with a
    zero coefficient are dropped, and a pass with no term and no decay does not touch the tensor."""
    live = [(s, a) for s, a in zip(seeds, coefs, strict=True) if a != 0.0]
    if live or decay != 0.0:
        zo_perturb_(tensor, [s for s, _ in live], [a for _, a in live], stream, decay, dist)
