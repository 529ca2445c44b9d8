"""The ε lower bound of a one-run privacy audit, from the number of correct membership guesses.

Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run" (arXiv 2305.08846), Theorem 5.2
and the computation of its appendix: m canaries are each included independently with probability ½; the auditor
guesses in/out for r of them and abstains on the rest; W is the number of correct guesses. If the training run
is (ε, δ)-DP with respect to each canary, then for every v

    P[W ≥ v] ≤ β + 2·m·δ·α,   β = P[Binomial(r, p) ≥ v],   α = max_{1 ≤ i ≤ v} P[v − i ≤ Binomial(r, p) < v] / i,

with p = e^ε / (1 + e^ε) (the accuracy of ε-DP randomised response). With δ = 0 this says W is dominated by
Binomial(r, p). So observing W = v rejects "(ε, δ)-DP" at confidence c when that p-value is below 1 − c; the
lower bound is the largest such ε, found by bisection (the p-value increases with ε).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["epsilon_lower_bound", "p_value"]


def _check(m: int, guesses: int, correct: int, delta: float) -> None:
    if not (isinstance(m, int) and isinstance(guesses, int) and isinstance(correct, int)):
        raise TypeError(f"flashdp.audit: m, guesses and correct must be ints, got {m!r}, {guesses!r}, {correct!r}")
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"flashdp.audit: need 0 ≤ correct ≤ guesses ≤ m, got correct={correct}, "
                         f"guesses={guesses}, m={m}")
    if not 0 <= delta < 1:
        raise ValueError(f"flashdp.audit: delta must be in [0, 1), got {delta}")


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The largest probability that an (ε, δ)-DP run lets ``correct`` or more of ``guesses`` guesses be right.

    Args:
        m: number of canaries (each included with probability ½).
        guesses: r, the guesses made (the rest abstained).
        correct: v, the correct guesses observed.
        epsilon, delta: the hypothesis "(ε, δ)-DP with respect to each canary".
    """
    _check(m, guesses, correct, delta)
    if epsilon < 0:
        raise ValueError(f"flashdp.audit.p_value: epsilon must be ≥ 0, got {epsilon}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, p))  # P[Binomial(r, p) ≥ v]
    # P[v − i ≤ Binomial < v] for i = 1..v: the pmf at v−1, v−2, ..., 0, accumulated
    below = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p))
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95,
                        tol: float = 1e-6) -> float:
    """The largest ε such that the run is not (ε, δ)-DP at the given confidence, given ``correct`` of ``guesses``.

    0 when even ε = 0 cannot be rejected. Bisection over ε to ``tol`` (returns the lower end: a valid bound).
    """
    _check(m, guesses, correct, delta)
    if not 0 < confidence < 1:
        raise ValueError(f"flashdp.audit.epsilon_lower_bound: confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, guesses, correct, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, guesses, correct, hi, delta) < level:  # ends: the p-value tends to P[Bin(r,1) ≥ v] = 1
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, guesses, correct, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo
