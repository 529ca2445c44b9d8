"""Privacy accounting: a thin adapter over Opacus's maintained accountants (no hand-written privacy maths).

    acct = flashdp.PrivacyAccountant("prv")            # or "rdp"
    opt = flashdp.DPOptimizer(inner, noise_multiplier=σ, expected_batch_size=B, accountant=acct, sample_rate=q)
    ... training ...
    acct.epsilon(delta=1e-5)

    σ = flashdp.get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=1000)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RDP_ALPHAS", "PrivacyAccountant", "get_noise_multiplier"]

_MECHANISMS = ("prv", "rdp")

# RDP orders: Opacus's defaults (1.1 .. 63) and larger ones, so that at small σ or large ε the best order lies
# inside the range (Opacus warns "Optimal order is the largest alpha" when it does not, and its ε is then looser).
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [2**k for k in range(6, 13)]
_LARGEST_ALPHA = "Optimal order is the largest alpha"


@contextmanager
def _accounting(mechanism: str) -> Iterator[dict]:
    """The keyword arguments of Opacus's ``get_epsilon`` for ``mechanism``, with its domain warning silenced.

    The PRV accountant sizes its discretisation domain with an RDP bound over Opacus's default orders and warns
    when the best of them is the largest. A looser bound there only widens the domain, so ε stays an upper
    bound: the warning says nothing about the ε returned. The RDP accountant gets ``RDP_ALPHAS`` instead."""
    with warnings.catch_warnings():
        if mechanism == "prv":
            warnings.filterwarnings("ignore", message=_LARGEST_ALPHA)
        yield {"alphas": RDP_ALPHAS} if mechanism == "rdp" else {}


def _kinds() -> dict:
    # Opacus is imported on first use: it takes seconds to import and most of flashdp does not need it.
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}


class PrivacyAccountant:
    """Track (ε, δ) of Poisson-subsampled Gaussian steps with Opacus's RDP or PRV accountant.

    Args:
        mechanism: ``"rdp"`` (Rényi DP, Mironov 2017; Opacus's default) or ``"prv"`` (privacy random
            variables, Gopi et al. 2021; tighter).
    """

    def __init__(self, mechanism: str = "prv"):
        if mechanism not in _MECHANISMS:
            raise ValueError(f"flashdp.PrivacyAccountant: mechanism must be one of {_MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism
        self._acct = _kinds()[mechanism]()

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step of the subsampled Gaussian mechanism."""
        if noise_multiplier < 0 or not 0 <= sample_rate <= 1:
            raise ValueError(f"flashdp.PrivacyAccountant.step: need noise_multiplier ≥ 0 and 0 ≤ sample_rate ≤ 1, "
                             f"got {noise_multiplier}, {sample_rate}")
        self._acct.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._acct.history)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at the given δ (0 before any step)."""
        if not 0 < delta < 1:
            raise ValueError(f"flashdp.PrivacyAccountant.epsilon: delta must be in (0, 1), got {delta}")
        if not self._acct.history:
            return 0.0
        with _accounting(self.mechanism) as kwargs:
            return float(self._acct.get_epsilon(delta=delta, **kwargs))

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": list(self._acct.history)}

    def load_state_dict(self, sd: dict) -> None:
        self.mechanism = sd["mechanism"]
        self._acct = _kinds()[self.mechanism]()
        self._acct.history = list(sd["history"])


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         steps: int | None = None, epochs: int | None = None, mechanism: str = "prv",
                         epsilon_tolerance: float = 0.01) -> float:
    """The smallest σ whose (ε, δ) after the given steps (or epochs) is at most ``target_epsilon`` (Opacus)."""
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ValueError(f"flashdp.get_noise_multiplier: need target_epsilon > 0 and 0 < target_delta < 1, "
                         f"got {target_epsilon}, {target_delta}")
    from opacus.accountants.utils import get_noise_multiplier as _opacus_get_noise_multiplier

    with _accounting(mechanism) as kwargs:
        return float(_opacus_get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                                  sample_rate=sample_rate, steps=steps, epochs=epochs,
                                                  accountant=mechanism, epsilon_tolerance=epsilon_tolerance,
                                                  **kwargs))
