"""flashdp.audit: canaries, scores, the accountant's ε for the canaries, and the audit on real training runs.

The detection configuration (documented in docs/flashdp.md, "Auditing the privacy of a run"): a residual MLP with
L = 18 clip groups (an input layer, 16 bias-free 32×32 blocks, a head; default thresholds C_l = 1/√18), T steps at
σ = √T / 0.5, so that the canaries' mechanism is 0.5-GDP (the accountant's ε ≈ 2.0 at δ = 1e-5), m = 1000
canaries, k+ = k− = 50, 95% confidence. Under the √L bug (σ·C_l per group) the effective multiplier is σ/√18
(≈ 2.1-GDP, true ε ≈ 9); with one group's noise skipped, that group's canary coordinates are noiseless.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize, stats
from torch import nn

import flashdp
from flashdp.audit import accountant_epsilon, guess, one_run_audit
from flashdp.audit_canaries import make_canaries
from flashdp.optimizer import DPOptimizer

BLOCKS, WIDTH, FEATURES, CLASSES = 16, 32, 32, 4


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATURES, WIDTH, bias=False)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, CLASSES, bias=False)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.head(h)


def private_mlp(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return flashdp.make_private(ResidualMLP(), max_grad_norm=1.0, **kw)


def batches(n: int = 8, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real batches of a 4-class Gaussian task (fixed size: the audit does not depend on the sampling)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, CLASSES, (size,), generator=g)
        out.append((centres[y] + torch.randn(size, FEATURES, generator=g), y))
    return out


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def audit(steps: int, seed: int = 0, **kw):
    """The documented configuration: σ = √T / 0.5 (0.5-GDP for the canaries)."""
    return one_run_audit(private_mlp(seed), batches(seed=seed), ce, noise_multiplier=math.sqrt(steps) / 0.5,
                         steps=steps, expected_batch_size=32, canaries=1000, seed=seed, **kw)


def sqrt_l_bug(self, name):  # the noise before the fix: σ·C_l on group l
    return self.noise_multiplier * self.privacy.threshold_of[name]


def skip_group_bug(orig):
    return lambda self, name: 0.0 if name == "blocks.3.weight" else orig(self, name)


# ------------------------------------------------------------------------------------------------ canaries
def dense(cans, included, model):
    state = flashdp.privacy_state(model)
    return {n: cans.sum_of(included, n, p.detach().double()) for n, p in state.parameters().items()}


def test_each_canary_has_norm_c_l_in_every_group_and_they_are_orthogonal():
    thresholds = {"blocks.0": 0.3, "head": 2.0}
    model = private_mlp(group_max_grad_norms=lambda path: thresholds.get(path))
    state = flashdp.privacy_state(model)
    m = 100  # < 128 coordinates of the head: distinct coordinates in every group
    cans = make_canaries(state, m, torch.Generator().manual_seed(1))
    expected = {g.param_names[0]: g.max_norm for g in state.groups}
    assert expected["blocks.0.weight"] == 0.3 and expected["head.weight"] == 2.0
    vecs = []
    for i in range(m):
        parts = dense(cans, torch.arange(m) == i, model)
        for name, c in expected.items():
            # one coordinate of value ±C_l: exact in float64
            assert parts[name].norm().item() == pytest.approx(c, rel=1e-15)
            assert int((parts[name] != 0).sum()) == 1
        vecs.append(torch.cat([v.flatten() for v in parts.values()]))
    gram = torch.stack(vecs) @ torch.stack(vecs).T
    c_total = math.sqrt(sum(c * c for c in expected.values()))
    assert cans.norm == pytest.approx(c_total, rel=1e-15)
    assert torch.allclose(gram, torch.eye(m, dtype=torch.float64) * c_total**2, rtol=0, atol=1e-12)


def test_more_canaries_than_a_group_has_coordinates_share_them_cyclically():
    model = private_mlp()
    cans = make_canaries(flashdp.privacy_state(model), 300, torch.Generator().manual_seed(0))
    head = cans.placements["head.weight"]  # 128 coordinates
    assert head.canary.numel() == 300 and head.index.unique().numel() == 128
    assert torch.bincount(head.index).max() == 3  # ⌈300/128⌉: spread evenly, not piled on one coordinate
    blk = cans.placements["blocks.0.weight"]  # 1024 coordinates: all distinct
    assert blk.index.unique().numel() == 300


def test_scores_separate_included_canaries_and_weight_a_quiet_group_up():
    model = private_mlp()
    state = flashdp.privacy_state(model)
    m = 1000
    cans = make_canaries(state, m, torch.Generator().manual_seed(0))
    included = torch.rand(m, generator=torch.Generator().manual_seed(1)) < 0.5
    g = torch.Generator().manual_seed(2)
    # noise std 30·C_total on every group but blocks.3, which gets none: that group alone identifies each canary
    delta = {n: s + (0.0 if n == "blocks.3.weight" else 30.0) * torch.randn(s.shape, generator=g, dtype=s.dtype)
             for n, s in dense(cans, included, model).items()}
    scores = cans.scores(delta)
    assert bool(scores[included].min() > scores[~included].max())
    # the plain inner product with each canary cannot: signal C_total² = 1 against noise std 30·C_total² = 30
    plain = torch.zeros(m, dtype=torch.float64)
    for n, pl in cans.placements.items():
        plain.index_add_(0, pl.canary, delta[n].flatten()[pl.index] * pl.value)
    assert not bool(plain[included].min() > plain[~included].max())


def test_guess_takes_the_top_and_bottom_scores():
    scores = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0, -1.0])
    assert guess(scores, 2, 1).tolist() == [0, -1, 1, 0, 1, 0]
    assert guess(scores, 0, 0).tolist() == [0] * 6
    with pytest.raises(ValueError, match="k_plus"):
        guess(scores, 4, 3)


# ------------------------------------------------------------------------------------------------ accountant
def gdp_epsilon(mu: float, delta: float) -> float:
    """ε of μ-GDP at δ (Dong, Roth, Su 2019, Cor. 2.13): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    return optimize.brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)
                           - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma,steps", [pytest.param(20.0, 100, marks=pytest.mark.slow), (math.sqrt(5) / 0.5, 5),
                                         (3.0, 4)])
def test_accountant_epsilon_is_that_of_t_full_batch_gaussian_steps(sigma, steps):
    # T Gaussian steps at sampling rate 1 compose exactly to μ-GDP with μ = √T/σ. PRV is an upper estimate whose
    # error Opacus bounds by eps_error = 0.01; RDP is a looser upper bound.
    exact = gdp_epsilon(math.sqrt(steps) / sigma, 1e-5)
    assert exact - 1e-6 <= accountant_epsilon(sigma, steps, 1e-5, "prv") <= exact + 0.02
    assert accountant_epsilon(sigma, steps, 1e-5, "rdp") >= exact - 1e-6


# ------------------------------------------------------------------------------------------------ audits
def test_the_audit_restores_the_model_and_refuses_bad_settings():
    model = private_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_run_audit(model, batches(), ce, noise_multiplier=4.0, steps=2, expected_batch_size=32, canaries=100)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="not made private"):
        one_run_audit(ResidualMLP(), batches(), ce, noise_multiplier=1.0, steps=1, expected_batch_size=32)
    with pytest.raises(ValueError, match="lr must be > 0"):
        one_run_audit(model, batches(), ce, noise_multiplier=1.0, steps=1, expected_batch_size=32, lr=0.0)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_audit(model, batches(), ce, noise_multiplier=1.0, steps=1, expected_batch_size=32, canaries=10,
                      k_plus=6, k_minus=5)
    with pytest.raises(ValueError, match="no batch"):
        one_run_audit(model, [], ce, noise_multiplier=1.0, steps=1, expected_batch_size=32)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_audit_detects_the_sqrt_l_bug_and_passes_the_corrected_mechanism(monkeypatch):
    """Default-run detection test: 5 steps (σ = 4.47), the documented configuration."""
    good = audit(steps=5)
    assert good.accountant_epsilon == pytest.approx(2.0, abs=0.05)
    assert good.epsilon_lower_bound < good.accountant_epsilon
    monkeypatch.setattr(DPOptimizer, "group_noise_std", sqrt_l_bug)
    bad = audit(steps=5)
    assert bad.accountant_epsilon == good.accountant_epsilon
    assert bad.epsilon_lower_bound > bad.accountant_epsilon, str(bad)


def test_audit_detects_noise_skipped_on_one_group(monkeypatch):
    monkeypatch.setattr(DPOptimizer, "group_noise_std", skip_group_bug(DPOptimizer.group_noise_std))
    bad = audit(steps=5)
    assert bad.epsilon_lower_bound > bad.accountant_epsilon, str(bad)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_audit_over_seeds_and_a_longer_run(monkeypatch, seed):
    good = audit(steps=50, seed=seed)
    assert good.epsilon_lower_bound < good.accountant_epsilon, str(good)
    orig = DPOptimizer.group_noise_std
    monkeypatch.setattr(DPOptimizer, "group_noise_std", sqrt_l_bug)
    assert audit(steps=50, seed=seed).exceeds_accountant
    monkeypatch.setattr(DPOptimizer, "group_noise_std", skip_group_bug(orig))
    assert audit(steps=50, seed=seed).exceeds_accountant


def test_flashdp_audit_is_reachable_from_the_package():
    assert flashdp.audit.one_run_audit is one_run_audit
