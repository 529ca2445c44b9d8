"""Empirical privacy audit of a flashdp run in one training run (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

    result = flashdp.audit.one_run_audit(model, loader, loss_fn, noise_multiplier=20.0, steps=100,
                                         expected_batch_size=32)
    print(result)     # the ε lower bound at 95% confidence beside the accountant's ε

Algorithm:

1. Draw m white-box gradient canaries (:mod:`flashdp.audit_canaries`: ±C_l on one coordinate of every clip
   group, norm C_total) and include each independently with probability ½.
2. Train the private model for ``steps`` steps of DP-SGD (``flashdp.DPOptimizer`` over plain SGD) on the real
   batches of ``data``; in every step, add the included canaries to the clipped sum the DP layers left in
   ``.grad`` just before ``DPOptimizer.step()`` adds the noise. An included canary is in **every** step
   (sampling rate 1), so the privacy the mechanism owes it is that of ``steps`` Gaussian steps with noise
   multiplier σ at sampling rate q = 1: that is the accountant's ε printed beside the bound (the same
   accountant, stepped with q = 1; the training data's own ε, at its Poisson rate, is smaller).
3. Score each canary from the parameter change θ_0 − θ_T (its inner product with the canary, each group
   weighted by its observed noise, see :meth:`Canaries.scores`); guess "in" for the k+ highest scores,
   "out" for the k− lowest, abstain on the rest.
4. Turn the number of correct guesses into a lower bound on ε at the given confidence
   (:func:`flashdp.audit_bound.epsilon_lower_bound`).

The model's parameters are restored when the audit returns (or raises); the optimizer is the audit's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .accounting import PrivacyAccountant
from .audit_bound import epsilon_lower_bound, p_value
from .audit_canaries import Canaries, make_canaries
from .optimizer import DPOptimizer
from .privatize import privacy_state

__all__ = ["AuditOutcome", "AuditResult", "epsilon_lower_bound", "guess", "one_run_audit", "p_value"]

CANARY_SAMPLE_RATE = 1.0  # an included canary is in every step (see the module docstring)


@dataclass(frozen=True)
class AuditOutcome:
    """What a one-run audit found, beside what the accountant reports for the canaries' mechanism (the fields
    every audited mechanism shares; :class:`AuditResult` for flashdp, ``zo2.dp_audit.DPZOAuditResult``)."""

    epsilon_lower_bound: float
    accountant_epsilon: float
    confidence: float
    delta: float
    canaries: int
    k_plus: int
    k_minus: int
    correct: int
    steps: int
    noise_multiplier: float
    canary_sample_rate: float
    accountant: str

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus

    @property
    def exceeds_accountant(self) -> bool:
        """Whether the lower bound is above the accountant's ε: the run added less noise than it accounted."""
        return self.epsilon_lower_bound > self.accountant_epsilon

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "guesses": self.guesses, "exceeds_accountant": self.exceeds_accountant}

    def report(self, header: str) -> str:
        """``header`` (what was audited, up to the guesses), then the bound, the accountant's ε and the verdict."""
        verdict = ("EXCEEDS the accountant's ε: the implementation adds less noise than it accounts"
                   if self.exceeds_accountant else "below the accountant's ε (consistent; this proves no privacy)")
        return (f"{header}, k+={self.k_plus}, k-={self.k_minus}: {self.correct}/{self.guesses} correct\n"
                f"  ε lower bound  {self.epsilon_lower_bound:8.3f}   ({self.confidence:.0%} confidence, "
                f"δ={self.delta:g})\n"
                f"  accountant ε   {self.accountant_epsilon:8.3f}   ({self.accountant}, σ={self.noise_multiplier:g}, "
                f"q={self.canary_sample_rate:g} for canaries, {self.steps} steps, δ={self.delta:g})\n"
                f"  {verdict}")


@dataclass(frozen=True)
class AuditResult(AuditOutcome):
    """flashdp's audit: gradient canaries of norm C_total over ``groups`` clip groups."""

    groups: int
    canary_norm: float

    def __str__(self) -> str:
        return self.report(f"one-run audit: {self.canaries} canaries (norm C_total={self.canary_norm:.4g} over "
                           f"{self.groups} clip groups)")


def guess(scores: Tensor, k_plus: int, k_minus: int) -> Tensor:
    """(m,) int8 guesses: +1 ("in") for the k+ highest scores, −1 ("out") for the k− lowest, 0 (abstain) else."""
    m = scores.numel()
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"flashdp.audit: need k_plus, k_minus ≥ 0 and k_plus + k_minus ≤ m={m}, "
                         f"got {k_plus}, {k_minus}")
    order = torch.argsort(scores, stable=True)
    out = torch.zeros(m, dtype=torch.int8)
    out[order[:k_minus]] = -1
    if k_plus:
        out[order[m - k_plus:]] = 1
    return out


def _batches(data: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``data``, iterated again whenever it is exhausted (a Poisson loader draws afresh)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("flashdp.audit.one_run_audit: data yielded no batch")


def accountant_epsilon(noise_multiplier: float, steps: int, delta: float, mechanism: str = "prv") -> float:
    """ε that ``mechanism``'s accountant reports for ``steps`` Gaussian steps at the canaries' sampling rate (1)."""
    acct = PrivacyAccountant(mechanism)
    for _ in range(steps):
        acct.step(noise_multiplier=noise_multiplier, sample_rate=CANARY_SAMPLE_RATE)
    if mechanism != "prv":
        return acct.epsilon(delta)
    with warnings.catch_warnings():  # Opacus's PRV at q = 1: log(1 − q) = log 0 in a branch it discards, and the
        warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)  # RDP bound it only uses to size its
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)  # grid of losses
        return acct.epsilon(delta)


def one_run_audit(model: nn.Module, data: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor | None], *,
                  noise_multiplier: float, steps: int, expected_batch_size: float, lr: float = 0.05,
                  canaries: int = 1000, k_plus: int | None = None, k_minus: int | None = None,
                  confidence: float = 0.95, delta: float = 1e-5, accountant: str = "prv",
                  seed: int = 0) -> AuditResult:
    """Audit DP-SGD on a private model in one training run; see the module docstring for the algorithm.

    Args:
        model: a model made private with ``flashdp.make_private`` (its parameters are restored afterwards).
        data: an iterable of batches (e.g. ``flashdp.poisson_loader``), iterated again when exhausted.
        loss_fn: ``loss_fn(model, batch)`` → scalar loss to backpropagate, or None to skip the backward (an
            empty batch; the step, its noise and the canaries are still applied).
        noise_multiplier: σ given to ``DPOptimizer``.
        steps: training steps T (one run).
        expected_batch_size: passed to ``DPOptimizer`` (the division only rescales the scores).
        lr: plain SGD's learning rate (> 0: the scores are read from the parameter change).
        canaries: m; k_plus, k_minus: guesses "in" / "out" (default m // 20 each).
        confidence: of the lower bound (0.95: a correct implementation exceeds its true ε w.p. ≤ 5%).
        delta: δ of both the bound and the accountant's ε.
        accountant: ``"prv"`` or ``"rdp"`` (:class:`flashdp.PrivacyAccountant`).
        seed: seeds the canaries, their inclusion and the DP noise (independent streams).

    Raises:
        ValueError: a model not made private, bad settings, or a step skipped for NaN/inf gradients.
    """
    state = privacy_state(model)
    if state is None:
        raise ValueError("flashdp.audit.one_run_audit: the model was not made private; call "
                         "flashdp.make_private(model, max_grad_norm) first")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flashdp.audit.one_run_audit: steps must be an int ≥ 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"flashdp.audit.one_run_audit: lr must be > 0 (the scores are read from the parameter "
                         f"change), got {lr!r}")
    k_plus = canaries // 20 if k_plus is None else k_plus
    k_minus = canaries // 20 if k_minus is None else k_minus
    gen = torch.Generator().manual_seed(seed)
    cans = make_canaries(state, canaries, gen)
    guess(torch.zeros(canaries), k_plus, k_minus)  # validates k± before training
    included = torch.rand(canaries, generator=gen) < 0.5
    params = state.parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    try:
        delta_theta = _train(model, data, loss_fn, cans, included, params, noise_multiplier, steps,
                             expected_batch_size, lr, seed)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
                p.grad = None
    guesses = guess(cans.scores(delta_theta), k_plus, k_minus)
    truth = torch.where(included, 1, -1).to(torch.int8)
    correct = int(((guesses != 0) & (guesses == truth)).sum())
    bound = epsilon_lower_bound(canaries, k_plus + k_minus, correct, delta, confidence)
    eps_acct = accountant_epsilon(noise_multiplier, steps, delta, accountant)
    return AuditResult(bound, eps_acct, confidence, delta, canaries, k_plus, k_minus, correct, steps,
                       float(noise_multiplier), CANARY_SAMPLE_RATE, accountant, len(cans.thresholds), cans.norm)


def _train(model: nn.Module, data: Iterable[Any], loss_fn: Callable, cans: Canaries, included: Tensor,
           params: dict[str, Tensor], sigma: float, steps: int, batch: float, lr: float,
           seed: int) -> dict[str, Tensor]:
    """The audited run: T DP-SGD steps with the included canaries in every clipped sum; returns θ_0 − θ_T."""
    start = {n: p.detach().to(torch.float64, copy=True) for n, p in params.items()}
    sums = {n: cans.sum_of(included, n, p.detach()) for n, p in params.items()}
    opt = DPOptimizer(torch.optim.SGD(list(params.values()), lr=lr), noise_multiplier=sigma,
                      expected_batch_size=batch, model=model, seed=seed + 1)
    batches = _batches(data)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, next(batches))
        if loss is not None:
            loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad += sums[n].to(p.grad.device)
        opt.step()
        if opt.skipped_steps:
            raise ValueError("flashdp.audit.one_run_audit: a step was skipped for NaN/inf gradients; the audit "
                             "needs every step applied (lower lr, or check the loss)")
    return {n: (start[n] - p.detach().to(torch.float64)).cpu() for n, p in params.items()}
