"""The one-run audit's ε lower bound against independent computations: exact binomial sums in rationals."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from flashdp.audit_bound import epsilon_lower_bound, p_value


def binom_tail_exact(r: int, v: int, p: Fraction) -> Fraction:
    """P[Binomial(r, p) ≥ v], summed term by term in exact rational arithmetic."""
    return sum((math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1)), Fraction(0))


def p_value_exact(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound written out directly: β + 2mδ·max_i P[v−i ≤ Bin < v]/i, each probability exact."""
    p = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    pmf = [math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:], Fraction(0))
    alpha, below = Fraction(0), Fraction(0)
    for i in range(1, v + 1):  # below = P[v − i ≤ Bin < v]
        below += pmf[v - i]
        alpha = max(alpha, below / i)
    return min(1.0, float(beta + 2 * m * Fraction(delta) * alpha))


# float64 evaluation of sums of at most r + 1 = 201 positive terms: relative error ≤ ~201·2^-53 ≈ 2e-14 per sum;
# scipy's binomial tail (incomplete beta) is accurate to ~1e-13 relative. 1e-9 leaves room for both.
REL = 1e-9


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (100, 100, 100, 2.0, 0.0), (1000, 100, 90, 1.5, 1e-5), (1000, 200, 150, 0.7, 1e-3), (50, 7, 5, 0.1, 0.0),
    (1000, 100, 97, 3.0, 1e-5), (10, 10, 1, 0.0, 0.01),
])
def test_p_value_matches_the_exact_binomial_computation(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(p_value_exact(m, r, v, eps, delta), rel=REL, abs=1e-300)


def test_without_delta_the_p_value_is_the_binomial_tail():
    p = Fraction(1) / (1 + Fraction(math.exp(-1.0)))
    for v in (0, 1, 55, 80, 100):
        assert p_value(100, 100, v, 1.0, 0.0) == pytest.approx(float(binom_tail_exact(100, v, p)), rel=REL)


@pytest.mark.parametrize("r,level", [(100, 0.05), (30, 0.01), (500, 0.05)])
def test_all_correct_without_delta_has_a_closed_form(r, level):
    # P[Bin(r, p) = r] = p^r = level  ⇒  p = level^(1/r), ε = log(p / (1 − p)).
    p = level ** (1 / r)
    expected = math.log(p / (1 - p))
    # bisection stops within tol = 1e-6 of the root, below it; float error in p^r is ~1e-15 relative
    got = epsilon_lower_bound(1000, r, r, 0.0, confidence=1 - level)
    assert expected - 2e-6 <= got <= expected + 1e-9


def test_the_bound_is_where_the_p_value_crosses_the_level():
    m, r, v, delta = 1000, 100, 93, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    assert eps > 0
    assert p_value_exact(m, r, v, eps, delta) < 0.05 <= p_value_exact(m, r, v, eps + 2e-6, delta)


def test_monotone_in_correct_guesses_delta_and_confidence():
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(0, 101)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    for v in range(50, 66):  # zero exactly when even ε = 0 cannot be rejected (58 of 100 cannot, 59 can)
        assert (bounds[v] == 0.0) == (p_value_exact(1000, 100, v, 0.0, 1e-5) >= 0.05), v
    assert bounds[100] > bounds[95] > bounds[90] > 0
    assert epsilon_lower_bound(1000, 100, 95, 1e-3) < epsilon_lower_bound(1000, 100, 95, 1e-5) \
        <= epsilon_lower_bound(1000, 100, 95, 0.0)
    assert epsilon_lower_bound(1000, 100, 95, 1e-5, confidence=0.99) < epsilon_lower_bound(1000, 100, 95, 1e-5)


def test_more_canaries_cost_more_through_delta():
    # the δ term is 2mδα: the same guesses among more canaries give a lower bound
    assert epsilon_lower_bound(10**5, 100, 98, 1e-5) < epsilon_lower_bound(100, 100, 98, 1e-5)


@pytest.mark.parametrize("args,match", [
    ((100, 10, 11, 1e-5), "correct ≤ guesses"), ((5, 10, 3, 1e-5), "guesses ≤ m"), ((100, 10, 5, 1.0), "delta"),
    ((100, 10, 5, -0.1), "delta"), ((100.0, 10, 5, 1e-5), "ints"),
])
def test_bad_input_is_refused(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        epsilon_lower_bound(*args)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(100, 10, 5, 1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        p_value(100, 10, 5, -1.0, 1e-5)
