"""zo2.DPZOSGD against independent references: ZOSGD on the mean loss (no clipping, no noise), the clipped
sums recomputed here from the per-sample losses the closure returned, the noise's law (chi-square bounds),
Opacus's accountant stepped by hand, and a resumed run.

Rounding: the models are float64, so a loss carries a relative error of a few units of 2^-53 (its
forward pass: two small matmuls and a mean of squares, ≲ 64 operations, |L| ≤ 10 here, so |δL| ≤ 1e-13).
A projected gradient divides a difference of two losses by 2ε: |δg| ≤ 2·1e-13 / 2e-3 = 1e-10. An update
moves a parameter by lr·g·z, so a g error moves it by lr·|δg|·|z|max ≤ 0.05·1e-10·6 = 3e-11 per step.
"""

import copy
import math

import pytest
import scipy.stats
import torch
from torch import nn

import flashdp
import zo2
from memtrain.testing import assert_close_verbose

EPS = 1e-3
LR = 0.05
PARAM_ATOL_PER_STEP = 3e-11  # module docstring: lr·|δg|·|z|max


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double().eval()


def data(step: int, batch: int = 7):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(batch, 5, generator=g).double(), torch.randn(batch, generator=g).double()


def per_sample(model, x, y):
    return (model(x).squeeze(1) - y) ** 2


class Recorder:
    """A closure returning the per-sample losses and keeping a copy of each call's result."""

    def __init__(self, model, x, y, scale=1.0):
        self.model, self.x, self.y, self.scale, self.calls = model, x, y, scale, []

    def __call__(self):
        losses = per_sample(self.model, self.x, self.y) * self.scale
        self.calls.append(losses.clone())
        return losses


def dp(model, **kwargs):
    args = dict(lr=LR, eps=EPS, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=7, seed=3)
    args.update(kwargs)
    return zo2.DPZOSGD(model.parameters(), **args)


# ------------------------------------------------------------------------------------ the estimator
@pytest.mark.parametrize("q", [1, 3])
def test_without_clipping_or_noise_the_trajectory_is_zosgd_on_the_mean_loss(q):
    """C never binds (|d_i| ≲ 50 ≪ 1e6), σ = 0, expected batch = realised batch: g = mean_i d_i, which is
    ZOSGD's (mean L+ − mean L−)/2ε up to rounding (module docstring)."""
    steps = 4
    a, b = mlp(), mlp()
    opt_dp = dp(a, max_grad_norm=1e6, weight_decay=0.01, num_perturbations=q)
    opt_zo = zo2.ZOSGD(b.parameters(), lr=LR, eps=EPS, weight_decay=0.01, seed=3, num_perturbations=q)
    for t in range(steps):
        x, y = data(t)
        opt_dp.step(lambda x=x, y=y: per_sample(a, x, y))
        opt_zo.step(lambda x=x, y=y: per_sample(b, x, y).mean())
        assert opt_dp.projected_grads == pytest.approx(opt_zo.projected_grads, rel=0, abs=1e-10)
    for (n, p), r in zip(a.named_parameters(), b.parameters(), strict=True):
        assert_close_verbose(p, r, atol=steps * PARAM_ATOL_PER_STEP, rtol=0, name=n)
    assert not torch.equal(next(a.parameters()), next(mlp().parameters()))  # it moved


def reference_sums(calls, q, c, mode):
    """Σ_i clip(d_i) per released coordinate, from the recorded losses with a per-sample loop in float64."""
    plus, minus = calls[0::2], calls[1::2]
    batch = plus[0].numel()
    d = [[(plus[k][i].item() - minus[k][i].item()) / (2 * EPS) for k in range(q)] for i in range(batch)]
    if mode == "aggregate":
        return [sum(max(-c, min(c, sum(di) / q)) for di in d)]
    sums = [0.0] * q
    for di in d:
        norm = math.sqrt(sum(v * v for v in di))
        scale = min(1.0, c / norm) if norm > 0 else 1.0
        for k in range(q):
            sums[k] += di[k] * scale
    return sums


@pytest.mark.parametrize(("q", "mode"), [(1, "joint"), (3, "joint"), (3, "aggregate")])
def test_projected_grad_is_the_clipped_sum_over_the_expected_batch(q, mode):
    """C = 0.5 binds for most samples (|d_i| up to ~10 here); B = 7 realised, 10 expected. The reference
    and the optimizer both read the same float64 losses, so they differ by the rounding of a sum of ≤ 7
    clipped terms of size ≤ C: ≤ 7 · 3 · 2^-53 · 0.5 / 10 < 1e-15; we allow 1e-13."""
    model = mlp(1)
    opt = dp(model, max_grad_norm=0.5, expected_batch_size=10, num_perturbations=q, clipping=mode)
    bound = 0
    for t in range(3):
        x, y = data(t)
        rec = Recorder(model, x, y, scale=3.0)
        opt.step(rec)
        assert len(rec.calls) == 2 * q
        expect = [s / 10 for s in reference_sums(rec.calls, q, 0.5, mode)]
        expect = expect * q if mode == "aggregate" else expect
        assert opt.projected_grads == pytest.approx(expect, rel=0, abs=1e-13)
        assert opt.projected_grad == pytest.approx(sum(expect) / q, rel=0, abs=1e-13)
        d = (rec.calls[0] - rec.calls[1]) / (2 * EPS)
        bound += int((d.abs() > 0.5).sum())
    assert bound > 3  # the clipping was exercised


def test_noise_has_std_sigma_c_over_expected_batch_and_is_independent_of_the_direction():
    """Losses independent of θ: d_i = 0, so g_t = σC·n_t / B_exp with n_t ~ N(0, 1) i.i.d.

    - Variance: (N−1)·s²/v ~ χ²(N−1); accepted within its two-sided 1e-6 quantiles (a correct
      implementation fails with probability 1e-6).
    - Mean: |mean| ≤ Φ⁻¹(1 − 5e-7)·sd/√N.
    - Independence from the released direction z: the update is −lr·g_t·z_t (wd = 0), so z_t[0] =
      −Δθ_t[0]/(lr·g_t) is what an observer of the parameters learns. Under independence the sample
      correlation of (g_t, z_t[0]) has std 1/√N; we bound it by 5/√N (false failure < 1e-6). Noise drawn
      with the direction's own key would make it 1."""
    n, sigma, c, bexp = 400, 1.3, 2.0, 16.0
    model = mlp(2)
    opt = dp(model, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=bexp)
    first = next(model.parameters())
    gs, zs = [], []
    const = torch.full((5,), 0.7, dtype=torch.float64)
    for _ in range(n):
        before = first.detach().flatten()[0].item()
        opt.step(lambda: const.clone())
        gs.append(opt.projected_grad)
        zs.append(-(first.detach().flatten()[0].item() - before) / (LR * opt.projected_grad))
    g = torch.tensor(gs, dtype=torch.float64)
    sd = sigma * c / bexp
    stat = (n - 1) * g.var().item() / sd**2
    lo, hi = scipy.stats.chi2.ppf([5e-7, 1 - 5e-7], n - 1)
    assert lo < stat < hi, (stat, lo, hi)
    assert abs(g.mean().item()) < scipy.stats.norm.ppf(1 - 5e-7) * sd / math.sqrt(n)
    corr = torch.corrcoef(torch.stack([g, torch.tensor(zs, dtype=torch.float64)]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n), corr


def test_empty_batch_releases_noise_only():
    """B = 0 (a Poisson batch can be empty): g is the step's noise over B_exp, the step is accounted."""
    sigma, c, bexp = 0.9, 1.5, 4.0
    a, b = mlp(), mlp()
    acct = flashdp.PrivacyAccountant("rdp")
    opt_empty = dp(a, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=bexp, accountant=acct,
                   sample_rate=0.1)
    opt_const = dp(b, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=bexp)
    loss = opt_empty.step(lambda: torch.empty(0, dtype=torch.float64))
    opt_const.step(lambda: torch.ones(3, dtype=torch.float64))  # θ-independent losses: d = 0, g = noise
    assert math.isnan(loss.item()) and opt_empty.last_batch_size == 0
    assert opt_empty.projected_grad != 0.0 and opt_empty.projected_grad == opt_const.projected_grad
    assert acct.steps == 1
    for p, r in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, r)


# ----------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_accountant_matches_opacus_and_skipped_steps_are_not_accounted(mechanism):
    """10 steps, one of them skipped (a NaN loss): ε equals Opacus's accountant stepped 9 times by hand."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, rate = 1.1, 0.05
    model = mlp()
    acct = flashdp.PrivacyAccountant(mechanism)
    opt = dp(model, noise_multiplier=sigma, accountant=acct, sample_rate=rate)
    for t in range(10):
        x, y = data(t)
        scale = math.nan if t == 4 else 1.0
        if t == 4:
            with pytest.warns(zo2.NonFiniteLossWarning):
                opt.step(Recorder(model, x, y, scale))
        else:
            opt.step(Recorder(model, x, y, scale))
    ref = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    for _ in range(9):
        ref.step(noise_multiplier=sigma, sample_rate=rate)
    assert acct.steps == 9 and opt.skipped_steps == 1 and opt.step_count == 10
    assert acct.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_an_opacus_accountant_is_stepped_directly():
    from opacus.accountants import RDPAccountant

    acct = RDPAccountant()
    model = mlp()
    opt = dp(model, noise_multiplier=0.8, accountant=acct, sample_rate=0.02)
    x, y = data(0)
    opt.step(Recorder(model, x, y))
    assert acct.history == [(0.8, 0.02, 1)]


# ------------------------------------------------------------------------------- skip and errors
def test_non_finite_per_sample_loss_skips_restores_and_releases_nothing():
    """One sample's L− is NaN: the step is skipped, the parameters restored (float64: the perturb and flip
    passes round θ by ≤ 2^-53·(|θ| + 2ε|z|) each, < 1e-15), nothing accounted, the counters advance."""
    model = mlp()
    acct = flashdp.PrivacyAccountant("rdp")
    opt = dp(model, noise_multiplier=1.0, accountant=acct, sample_rate=0.1)
    before = copy.deepcopy(model)
    x, y = data(0)
    calls = []

    def closure():
        losses = per_sample(model, x, y)
        calls.append(1)
        if len(calls) == 2:
            losses[3] = math.nan
        return losses

    with pytest.warns(zo2.NonFiniteLossWarning, match="non-finite per-sample loss"):
        loss = opt.step(closure)
    assert math.isnan(loss.item()) and math.isnan(opt.projected_grad)
    assert acct.steps == 0 and opt.skipped_steps == 1 and opt.step_count == 1
    for (n, p), r in zip(model.named_parameters(), before.parameters(), strict=True):
        assert_close_verbose(p, r, atol=1e-15, rtol=0, name=n)


def test_scalar_closure_is_refused_with_the_fix_and_nothing_changes():
    model = mlp()
    acct = flashdp.PrivacyAccountant("rdp")
    opt = dp(model, noise_multiplier=1.0, accountant=acct, sample_rate=0.1)
    before = copy.deepcopy(model)
    x, y = data(0)
    with pytest.raises(ValueError, match="scalar loss") as info:
        opt.step(lambda: per_sample(model, x, y).mean())
    message = str(info.value)
    assert "reduction='none'" in message and "zo2.per_sample_lm_loss" in message
    assert acct.steps == 0 and opt.step_count == 0
    for p, r in zip(model.parameters(), before.parameters(), strict=True):
        assert_close_verbose(p, r, atol=1e-15, rtol=0)
    with pytest.raises(TypeError, match="returned float"):
        opt.step(lambda: 1.0)
    with pytest.raises(ValueError, match=r"shape \(7, 1\)"):
        opt.step(lambda: per_sample(model, x, y)[:, None])


def test_halves_with_different_batch_sizes_are_refused():
    model = mlp()
    opt = dp(model)
    x, y = data(0)
    calls = []

    def closure():
        calls.append(1)
        return per_sample(model, x, y)[: 7 - len(calls) % 2]

    with pytest.raises(ValueError, match="different lengths"):
        opt.step(closure)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": math.inf}, "max_grad_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"clipping": "per_direction"}, "clipping"),
        ({"accountant": flashdp.PrivacyAccountant("rdp")}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp(mlp(), **kwargs)


def test_accumulation_and_groups_with_different_eps_are_refused():
    model = mlp()
    opt = dp(model)
    with pytest.raises(TypeError, match="accumulate is not supported"):
        opt.step(accumulate=[lambda: torch.zeros(2)])
    groups = zo2.DPZOSGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "eps": 1e-2}],
                         lr=LR, eps=EPS, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    x, y = data(0)
    with pytest.raises(ValueError, match="same eps"):
        groups.step(lambda: per_sample(model, x, y))


# ------------------------------------------------------------------------------------- resume
def test_resume_continues_the_identical_trajectory_and_the_accounting():
    """Same ops in the same order on the same values: the resumed run is bit-identical."""
    def run(model, opt, steps):
        for t in steps:
            x, y = data(t)
            opt.step(lambda x=x, y=y: per_sample(model, x, y))

    kwargs = dict(noise_multiplier=0.7, max_grad_norm=0.3, num_perturbations=2, sample_rate=0.1)
    a = mlp()
    opt_a = dp(a, accountant=flashdp.PrivacyAccountant("rdp"), **kwargs)
    run(a, opt_a, range(3))
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    run(a, opt_a, range(3, 6))

    b = mlp(5)
    b.load_state_dict(saved_model)
    opt_b = dp(b, accountant=flashdp.PrivacyAccountant("rdp"), **kwargs)
    opt_b.load_state_dict(saved_opt)
    run(b, opt_b, range(3, 6))
    for p, r in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, r)
    assert opt_b.accountant.steps == 6 and opt_b.accountant.epsilon(1e-5) == opt_a.accountant.epsilon(1e-5)

    with pytest.raises(ValueError, match="noise_multiplier"):
        dp(mlp(), accountant=flashdp.PrivacyAccountant("rdp"), **{**kwargs, "noise_multiplier": 1.0}
           ).load_state_dict(saved_opt)
    with pytest.raises(ValueError, match="accountant"):
        dp(mlp(), noise_multiplier=0.7, max_grad_norm=0.3, num_perturbations=2, sample_rate=0.1
           ).load_state_dict(saved_opt)


# ------------------------------------------------------------------------------ per-sample loss
def test_per_sample_lm_loss_matches_hugging_face_per_sample(opt_model, batch):
    """Each sample's loss is Hugging Face's loss of that sample alone (shifted labels, -100 ignored);
    float32 logits of size ≲ 5 and means over ≤ 8 tokens: a few ulp(5) ≈ 1e-6."""
    labels = batch["labels"].clone()
    labels[1, 5:] = -100
    labels[2, :] = -100  # a sample with no labelled token: loss 0
    logits = opt_model(input_ids=batch["input_ids"]).logits
    got = zo2.per_sample_lm_loss(logits, labels)
    assert got.shape == (3,)
    for i in range(2):
        ref = opt_model(input_ids=batch["input_ids"][i: i + 1], labels=labels[i: i + 1]).loss
        assert got[i].item() == pytest.approx(ref.item(), abs=2e-6)
    assert got[2].item() == 0.0
    with pytest.raises(ValueError, match="logits"):
        zo2.per_sample_lm_loss(logits[0], labels)
