"""zo2.dp_audit: the canaries' patterns, their insertion into DPZOSGD's per-sample differences, and the one-run
audit of DPZOSGD against the accountant, with the noise bug it must detect (σC/10).

The detection configuration: T = 64 steps, q = 16 directions, joint clipping: 1024 released coordinates, m = 1000
canaries with difference 2C per step (clipped to C), k+ = k- = 50, σ = √T/0.5 = 16, so that the canaries'
mechanism is 0.5-GDP (accountant ε ≈ 2.0 at δ = 1e-5), as flashdp's audit test. With the noise at σC/10 it is
5-GDP (true ε ≈ 33 at δ = 1e-5): the canaries separate and the bound reaches what 100 guesses can show, 3.465 > 2.0.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from zo2.dp_audit import _train, canary_patterns, one_run_audit
from zo2.dp_optimizer import DPZOSGD

FEATURES, CLASSES = 8, 4


def tiny_task(seed: int = 0, batches: int = 8, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g)
    out = []
    for _ in range(batches):
        y = torch.randint(0, CLASSES, (size,), generator=g)
        out.append((centres[y] + torch.randn(size, FEATURES, generator=g), y))
    return out


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).eval()


def ce(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y, reduction="none")


def no_data(m, batch):
    return torch.zeros(0)


def audit(seed: int = 0, **kw):
    steps = 64
    return one_run_audit(model(seed), tiny_task(seed), ce, noise_multiplier=math.sqrt(steps) / 0.5, steps=steps,
                         max_grad_norm=1.0, expected_batch_size=16, num_perturbations=16, canaries=1000, seed=seed,
                         **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few dozen elements: a second thread only adds synchronisation (on a busy 2-core machine it made
    each cross-entropy call 100× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ patterns
def test_patterns_are_orthogonal_signs_and_too_few_coordinates_are_refused():
    h = canary_patterns(100, 200, torch.Generator().manual_seed(0))  # 200 released → N = 128 patterned
    assert h.shape == (100, 128) and set(h.unique().tolist()) == {-1.0, 1.0}
    # ±1 entries: the Gram matrix is computed exactly in float64
    assert torch.equal(h @ h.T, 128 * torch.eye(100, dtype=torch.float64))
    assert h.sum(1).abs().max() < 128  # the all-ones row is left out
    with pytest.raises(ValueError, match=r"129 orthogonal patterns but .* give 128"):
        canary_patterns(128, 200, torch.Generator())


# ------------------------------------------------------------------------------------------------ insertion
@pytest.mark.parametrize(("q", "clipping"), [(1, "joint"), (3, "joint"), (2, "aggregate")])
def test_the_released_g_is_the_clipped_sum_of_the_included_canaries(q, clipping):
    """σ = 0 and no real samples: each step releases Σ_j clip(δ_j)/B_exp, computed here from the patterns alone.
    A canary's difference has norm 2C per step; clipped, it is C·h_j/√r on the step's r coordinates."""
    steps, m, c, b_exp = 8, 5, 0.7, 4.0
    per_step = q if clipping == "joint" else 1
    h = canary_patterns(m, steps * per_step, torch.Generator().manual_seed(1))
    inside = h[[0, 2, 3]]
    opt = DPZOSGD(model().parameters(), lr=0.01, eps=1e-3, max_grad_norm=c, noise_multiplier=0.0,
                  expected_batch_size=b_exp, num_perturbations=q, clipping=clipping)
    got = _train(model(), tiny_task(), no_data, opt, inside, steps, per_step, 2 * c)
    # each canary's difference: 2C/√r · h on the patterned coordinates, 0 past them; clipped per step to norm C
    delta = torch.zeros(3, steps * per_step, dtype=torch.float64)
    delta[:, :h.shape[1]] = inside * 2 * c / math.sqrt(per_step)
    delta = delta.view(3, steps, per_step)
    norms = delta.norm(dim=2, keepdim=True)
    want = (delta * torch.clamp(c / norms, max=1.0)).sum(0).flatten() / b_exp
    # each d = (0 - (-2ε·δ)) / 2ε is δ to a few ulp (|δ| ≤ 2C = 1.4), the clip scales it by C/‖d‖ (a few ulp more):
    # ≤ 3 canaries · 8 ulp · 1.4 / B_exp ≈ 2e-15
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_audit_restores_the_model_and_refuses_bad_settings():
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    one_run_audit(m, tiny_task(), ce, noise_multiplier=4.0, steps=2, max_grad_norm=1.0, expected_batch_size=16,
                  num_perturbations=64, canaries=100)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16)
    with pytest.raises(ValueError, match="orthogonal patterns"):
        one_run_audit(m, tiny_task(), ce, steps=10, num_perturbations=1, canaries=100, **kw)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_audit(m, tiny_task(), ce, steps=4, num_perturbations=8, canaries=20, k_plus=11, k_minus=10, **kw)
    with pytest.raises(ValueError, match="canary_scale"):
        one_run_audit(m, tiny_task(), ce, steps=4, num_perturbations=8, canaries=20, canary_scale=0.5, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        one_run_audit(m, tiny_task(), lambda mm, b: torch.full((3,), float("nan")), steps=4, num_perturbations=8,
                      canaries=20, **kw)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


# ------------------------------------------------------------------------------------------------ detection
def test_audit_stays_below_the_accountant_and_detects_noise_at_a_tenth(monkeypatch):
    good = audit()
    assert good.accountant_epsilon == pytest.approx(2.0, abs=0.05)
    assert good.released == good.patterned == 1024
    assert good.epsilon_lower_bound < good.accountant_epsilon, str(good)
    orig = DPZOSGD._noise
    monkeypatch.setattr(DPZOSGD, "_noise", lambda self, *a: 0.1 * orig(self, *a))
    bad = audit()
    assert bad.accountant_epsilon == good.accountant_epsilon
    assert bad.epsilon_lower_bound > bad.accountant_epsilon, str(bad)



@pytest.mark.slow
@pytest.mark.parametrize(("seed", "q", "clipping"), [(1, 16, "joint"), (2, 16, "joint"), (3, 16, "joint"),
                                                     (1, 2, "aggregate")])
def test_audit_over_seeds_and_aggregate_clipping(monkeypatch, seed, q, clipping):
    """Aggregate clipping releases one coordinate per step: 1024 steps (σ = √1024/0.5 = 64, again 0.5-GDP)."""
    steps = 1024 if clipping == "aggregate" else 64
    kw = dict(noise_multiplier=math.sqrt(steps) / 0.5, steps=steps, max_grad_norm=1.0, expected_batch_size=16,
              num_perturbations=q, clipping=clipping, canaries=1000, seed=seed)
    good = one_run_audit(model(seed), tiny_task(seed), ce, **kw)
    assert good.epsilon_lower_bound < good.accountant_epsilon, str(good)
    orig = DPZOSGD._noise
    monkeypatch.setattr(DPZOSGD, "_noise", lambda self, *a: 0.1 * orig(self, *a))
    assert one_run_audit(model(seed), tiny_task(seed), ce, **kw).exceeds_accountant


def test_the_audit_is_reachable_from_the_package_and_imported_on_first_use(tmp_path):
    code = ("import sys, zo2\n"
            "assert 'zo2.dp_audit' not in sys.modules\n"
            "assert callable(zo2.dp_audit.one_run_audit)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # cwd: keep the checkout off sys.path
