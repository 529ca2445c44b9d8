"""Empirical privacy audit of a :class:`zo2.DPZOSGD` run in one training run (Steinke, Nasr, Jagielski 2023).

    result = zo2.dp_audit.one_run_audit(model, loader, per_sample_loss, noise_multiplier=20.0, steps=100,
                                        max_grad_norm=1.0, expected_batch_size=32, num_perturbations=16)
    print(result)     # the ε lower bound at 95% confidence beside the accountant's ε

What DPZOSGD releases in step t is g_t = (Σ_i clip(d_i) + N(0, σ²C²·I_r)) / B_exp, a vector of r coordinates
(r = q with ``clipping="joint"``, 1 with ``"aggregate"``): ``opt.projected_grads``. The audit's canaries are
samples of that mechanism, inserted where the data enter it: the per-sample losses the closure returns.

1. m canaries, each included independently with probability ½. Canary j follows a pattern h_j ∈ {±1}^N over the
   first N = 2^⌊log2(T·r)⌋ released coordinates of the run (rows 1..m of a Sylvester Hadamard matrix, with its
   columns permuted and each row's sign flipped at random: orthogonal, so included canaries do not mask each
   other). Its projected difference on coordinate c is ``canary_scale``·C·h_j[c]/√r, i.e. norm
   ``canary_scale``·C in each step: twice the clipping bound by default, so the clip must bring it to C, the
   worst case the noise is calibrated for.
2. Train T steps of DPZOSGD on the real batches. The closure returns the real samples' per-sample losses followed,
   for each included canary, by 0 at θ+εz_k and −2ε·δ at θ−εz_k (δ its difference on direction k), so that
   (ℓ+ − ℓ−)/2ε = δ. Halves come in ZOSGD's order (L+_0, L-_0, L+_1, ...). An included canary is in every step
   (sampling rate 1), so the privacy owed to it is that of T Gaussian steps with multiplier σ at rate 1: the
   accountant's ε printed beside the bound (the training data's own ε, at their Poisson rate, is smaller).
3. Score canary j by ⟨h_j, G⟩, G the released g_t of every step concatenated; guess "in" for the k+ highest,
   "out" for the k− lowest; turn the correct guesses into an ε lower bound (:mod:`flashdp.audit_bound`).

A correct mechanism keeps the bound below the accountant's ε (at 95% confidence, 19 runs in 20). Noise at 1/10
of σC makes the canaries' mechanism 10× less noisy and the bound exceeds the accountant's ε (docs/dpzo.md). The
model's parameters are restored when the audit returns or raises; the optimizer is the audit's own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from scipy.linalg import hadamard
from torch import Tensor, nn

from flashdp.audit import AuditOutcome, _batches, accountant_epsilon, guess
from flashdp.audit_bound import epsilon_lower_bound
from zo2.dp_optimizer import CLIPPING_MODES, DPZOSGD
from zo2.optimizer import NonFiniteLossWarning

__all__ = ["DPZOAuditResult", "canary_patterns", "one_run_audit"]

CANARY_SAMPLE_RATE = 1.0  # an included canary is in every step


@dataclass(frozen=True)
class DPZOAuditResult(AuditOutcome):
    """The audit of DPZOSGD: canaries as per-sample loss differences along patterns of released coordinates."""

    num_perturbations: int
    clipping: str
    released: int  # T·r coordinates released by the run
    patterned: int  # N, the coordinates the canaries' patterns span
    canary_scale: float

    def __str__(self) -> str:
        return self.report(f"one-run audit of zo2.DPZOSGD ({self.clipping} clipping, q={self.num_perturbations}): "
                           f"{self.canaries} canaries over {self.patterned} of {self.released} released "
                           f"coordinates (difference {self.canary_scale:g}·C per step before clipping)")


def canary_patterns(m: int, released: int, generator: torch.Generator) -> Tensor:
    """(m, N) float64 ±1 patterns, N = 2^⌊log2(released)⌋: rows 1..m of the order-N Sylvester Hadamard matrix
    (row 0, all ones, is left out), columns permuted and rows negated at random. Pairwise orthogonal."""
    if released < 2:
        raise ValueError(f"zo2.dp_audit: the run releases {released} coordinate(s); canaries need at least 2")
    n = 1 << (released.bit_length() - 1)
    if m + 1 > n:
        raise ValueError(f"zo2.dp_audit: {m} canaries need {m + 1} orthogonal patterns but the run's "
                         f"{released} released coordinates (steps × released per step) give {n}: raise steps or "
                         "num_perturbations (joint clipping releases q per step), or use fewer canaries")
    h = torch.from_numpy(hadamard(n)).to(torch.float64)[1:m + 1]
    h = h[:, torch.randperm(n, generator=generator)]
    return h * (torch.randint(0, 2, (m, 1), generator=generator, dtype=torch.float64) * 2 - 1)


def one_run_audit(model: nn.Module, data: Iterable[Any], per_sample_loss: Callable[[nn.Module, Any], Tensor], *,
                  noise_multiplier: float, steps: int, max_grad_norm: float, expected_batch_size: float,
                  lr: float = 0.01, eps: float = 1e-3, num_perturbations: int = 1, clipping: str = "joint",
                  canaries: int = 1000, k_plus: int | None = None, k_minus: int | None = None,
                  canary_scale: float = 2.0, confidence: float = 0.95, delta: float = 1e-5,
                  accountant: str = "prv", seed: int = 0) -> DPZOAuditResult:
    """Audit DPZOSGD in one training run; see the module docstring for the algorithm.

    Args:
        model: the model trained (its parameters are restored afterwards; dropout off: ZO needs it).
        data: an iterable of batches (e.g. ``flashdp.poisson_loader``), iterated again when exhausted.
        per_sample_loss: ``per_sample_loss(model, batch)`` → the batch's per-sample losses, shape (B,).
        noise_multiplier, max_grad_norm, expected_batch_size, lr, eps, num_perturbations, clipping: DPZOSGD's.
        steps: training steps T (one run).
        canaries: m; k_plus, k_minus: guesses "in" / "out" (default m // 20 each).
        canary_scale: a canary's projected difference per step before clipping, in units of C (≥ 1).
        confidence: of the lower bound; delta: δ of both the bound and the accountant's ε.
        accountant: ``"prv"`` or ``"rdp"`` (:class:`flashdp.PrivacyAccountant`).
        seed: seeds the canaries, their inclusion and DPZOSGD (directions and noise).

    Raises:
        ValueError: bad settings (too few released coordinates for the canaries, k± out of range), or a step
            skipped for a non-finite loss (the audit needs every step applied).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"zo2.dp_audit.one_run_audit: steps must be an int ≥ 1, got {steps!r}")
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"zo2.dp_audit.one_run_audit: clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    if not (isinstance(canary_scale, (int, float)) and math.isfinite(canary_scale) and canary_scale >= 1):
        raise ValueError(f"zo2.dp_audit.one_run_audit: canary_scale must be ≥ 1 (a canary at the clipping bound "
                         f"or beyond it), got {canary_scale!r}")
    k_plus = canaries // 20 if k_plus is None else k_plus
    k_minus = canaries // 20 if k_minus is None else k_minus
    per_step = num_perturbations if clipping == "joint" else 1
    gen = torch.Generator().manual_seed(seed)
    patterns = canary_patterns(canaries, steps * per_step, gen)
    guess(torch.zeros(canaries), k_plus, k_minus)  # validates k± before training
    included = torch.rand(canaries, generator=gen) < 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = DPZOSGD(params, lr=lr, eps=eps, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                  expected_batch_size=expected_batch_size, seed=seed + 1, num_perturbations=num_perturbations,
                  clipping=clipping)
    try:
        released = _train(model, data, per_sample_loss, opt, patterns[included], steps, per_step,
                          canary_scale * max_grad_norm)
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
    scores = patterns @ released[:patterns.shape[1]]
    guesses = guess(scores, k_plus, k_minus)
    truth = torch.where(included, 1, -1).to(torch.int8)
    correct = int(((guesses != 0) & (guesses == truth)).sum())
    bound = epsilon_lower_bound(canaries, k_plus + k_minus, correct, delta, confidence)
    eps_acct = accountant_epsilon(noise_multiplier, steps, delta, accountant)
    return DPZOAuditResult(bound, eps_acct, confidence, delta, canaries, k_plus, k_minus, correct, steps,
                           float(noise_multiplier), CANARY_SAMPLE_RATE, accountant, num_perturbations, clipping,
                           steps * per_step, patterns.shape[1], float(canary_scale))


def _train(model: nn.Module, data: Iterable[Any], per_sample_loss: Callable, opt: DPZOSGD, inside: Tensor,
           steps: int, per_step: int, amplitude: float) -> Tensor:
    """The audited run; returns the (T·r,) float64 released g of every step, in order."""
    q = opt.num_perturbations
    eps = opt.param_groups[0]["eps"]
    # the included canaries' differences: (steps, r, m_in) over the patterned coordinates, zero past them
    diffs = torch.zeros(steps * per_step, inside.shape[0], dtype=torch.float64)
    diffs[:inside.shape[1]] = inside.T * (amplitude / math.sqrt(per_step))
    diffs = diffs.view(steps, per_step, -1)
    batches = _batches(data)
    released = []
    for t in range(steps):
        closure = _closure(model, next(batches), per_sample_loss, diffs[t], q, eps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteLossWarning)  # refused below, with the audit's reason
            opt.step(closure)
        if opt.skipped_steps:
            raise ValueError(f"zo2.dp_audit.one_run_audit: step {t} was skipped for a non-finite loss; the audit "
                             "needs every step applied (lower lr, or check the loss)")
        released.extend(opt.projected_grads[:per_step])
    return torch.tensor(released, dtype=torch.float64)


def _closure(model: nn.Module, batch: Any, per_sample_loss: Callable, diffs: Tensor, q: int, eps: float
             ) -> Callable[[], Tensor]:
    """One step's closure: the real per-sample losses, then the included canaries' (``diffs``: (r, m_in)).
    Half h of the step (ZOSGD's order L+_0, L-_0, L+_1, ...) is direction h // 2, sign + for even h."""
    calls = [0]

    def closure() -> Tensor:
        half = calls[0] % (2 * q)
        calls[0] += 1
        real = per_sample_loss(model, batch).detach().to(torch.float64).reshape(-1)
        d = diffs[half // 2] if diffs.shape[0] == q else diffs[0]  # aggregate: the same on every direction
        return torch.cat([real, torch.zeros_like(d) if half % 2 == 0 else -2.0 * eps * d])

    return closure
