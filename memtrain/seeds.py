"""The seed schedule shared by zo2 (perturbation directions) and flashdp (DP noise).

A run's base seed, a step and a direction index map to one 64-bit Philox key through SplitMix64's
finaliser, ``seed(t, k) = H(H(H(base) ⊕ t) ⊕ k)``, so a step's randomness is a pure function of
(seed, step) and a resumed run needs no generator state.
"""

from __future__ import annotations

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
