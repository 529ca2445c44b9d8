"""DPOptimizer: trajectory against a textbook DP-SGD step, noise level, accumulation, schedulers, state."""

import copy

import pytest
import torch
from torch import nn

import flashdp


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _loss(m, x):
    return m(x).pow(2).sum(1).mean()


def test_zero_noise_sgd_matches_reference_step(ref):
    model = _model()
    x = torch.randn(8, 4) * 3
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), 8, 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                              expected_batch_size=10)
    _loss(model, x).backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), before[n].double() - 0.5 * want[n] / 10, rtol=1e-5,
                                   atol=1e-6)


def test_noise_level_and_once_per_logical_step():
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 20))
    C, sigma, B = 2.0, 3.0, 4
    flashdp.make_private(model, C)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                              expected_batch_size=B, seed=1)
    c_total = C  # two groups at the default C/√2 each: C_total = √(2·C²/2) = C
    x = torch.zeros(3, 20)  # zero model and input: the clipped sums are 0, the update is the noise
    for p in model.parameters():
        p.data.zero_()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):  # five micro-batches accumulated: noise is still added once
        (model(x).sum() * 0).backward()
    opt.step()
    upd = torch.cat([(b - p.detach()).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    std = upd.std().item() * B
    assert std == pytest.approx(sigma * c_total, rel=0.05)  # noise added once (5 times would be √5 larger)


def test_noise_std_statistics():
    model = nn.Linear(300, 300)
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0,
                              expected_batch_size=1, seed=3)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    w0 = model.weight.detach().clone()
    opt.step()
    noise = (w0 - model.weight.detach()).flatten()
    assert noise.std().item() == pytest.approx(2.0, rel=0.02)
    assert abs(noise.mean().item()) < 0.02


def test_secure_mode_noise_std():
    model = nn.Linear(200, 200, bias=False)
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.5,
                              expected_batch_size=1, secure_mode=True)
    model.weight.grad = torch.zeros_like(model.weight)
    w0 = model.weight.detach().clone()
    opt.step()
    assert (w0 - model.weight.detach()).std().item() == pytest.approx(1.5, rel=0.03)


@pytest.mark.parametrize("inner", ["sgd", "adam", "adamw"])
def test_state_dict_round_trip_and_resume(inner):
    def make():
        model = _model()
        flashdp.make_private(model, 1.0)
        cls = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": lambda p: torch.optim.Adam(p, 1e-2),
               "adamw": lambda p: torch.optim.AdamW(p, 1e-2)}[inner]
        opt = flashdp.DPOptimizer(cls(model.parameters()), noise_multiplier=1.0, expected_batch_size=4, seed=7)
        return model, opt

    x = torch.randn(4, 4)
    m1, o1 = make()
    for _ in range(2):
        _loss(m1, x).backward()
        o1.step()
        o1.zero_grad()
    sd = copy.deepcopy(o1.state_dict())
    msd = copy.deepcopy(m1.state_dict())
    _loss(m1, x).backward()
    o1.step()
    m2, o2 = make()
    m2.load_state_dict(msd)
    o2.load_state_dict(sd)
    assert o2.steps == 2
    _loss(m2, x).backward()
    o2.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2)


def test_lr_scheduler_shares_param_groups():
    model = _model()
    flashdp.make_private(model, 1.0)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = flashdp.DPOptimizer(inner, noise_multiplier=0.5, expected_batch_size=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _loss(model, torch.randn(2, 4)).backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is inner.param_groups


def test_optimizer_built_before_make_private_sees_same_tensors():
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = [id(p) for p in model.parameters()]
    flashdp.make_private(model, 1.0)
    assert [id(p) for p in model.parameters()] == ids
    opt = flashdp.DPOptimizer(inner, noise_multiplier=1.0, expected_batch_size=2)
    _loss(model, torch.randn(2, 4)).backward()
    opt.step()


def test_bad_arguments():
    model = _model()
    flashdp.make_private(model, 1.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"max_grad_norm=2\.0 differs"):
        flashdp.DPOptimizer(sgd, noise_multiplier=1.0, expected_batch_size=2, max_grad_norm=2.0)
    flashdp.DPOptimizer(sgd, noise_multiplier=1.0, expected_batch_size=2, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        flashdp.DPOptimizer(sgd, noise_multiplier=-1.0, expected_batch_size=2)
    with pytest.raises(ValueError, match="expected_batch_size"):
        flashdp.DPOptimizer(sgd, noise_multiplier=1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="make_private"):
        flashdp.DPOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), noise_multiplier=1.0,
                            expected_batch_size=2)


def test_nan_gradients_skip_step_with_warning():
    model = _model()
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, torch.randn(2, 4)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.step() is None
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert opt.steps == 0 and opt.skipped_steps == 1


def test_empty_batch_step_still_adds_noise():
    model = _model()
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                              expected_batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no backward at all (empty Poisson batch)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))


def test_accountant_is_stepped():
    model = _model()
    flashdp.make_private(model, 1.0)
    acct = flashdp.PrivacyAccountant("rdp")
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=2, accountant=acct, sample_rate=0.01)
    for _ in range(3):
        _loss(model, torch.randn(2, 4)).backward()
        opt.step()
        opt.zero_grad()
    assert acct.steps == 3 and acct.epsilon(1e-5) > 0


def test_model_changed_after_make_private():
    model = _model()
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=2)
    model[2] = nn.Linear(6, 2)  # replaced module: its parameters were never privatised
    with pytest.raises(flashdp.ModelChangedError, match="make_private"):
        opt.step()


def test_noise_state_is_seed_and_step_and_old_generator_states_are_refused_loudly():
    model = _model()
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=2, seed=11)
    opt.step()
    sd = opt.state_dict()
    assert {k: sd["flashdp"][k] for k in ("seed", "steps")} == {"seed": 11, "steps": 1}
    assert "generators" not in sd["flashdp"]
    old = copy.deepcopy(sd)
    old["flashdp"]["generators"] = {"cpu": torch.Generator().get_state()}  # a checkpoint of an older flashdp
    with pytest.warns(RuntimeWarning, match="counter-based"):
        opt.load_state_dict(old)
    assert opt.steps == 1


def _stepped_adamw(width: int, dtype=torch.float32, seed: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).to(dtype)
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), noise_multiplier=1.0,
                              expected_batch_size=4, seed=seed)
    return model, opt


@pytest.mark.parametrize("other,match", [
    (dict(width=3), r"parameter 0 \(0\.weight\) is float32 of shape \(3, 4\) here but float32 of shape \(6, 4\)"),
    (dict(width=6, dtype=torch.float64), r"parameter 0 \(0\.weight\) is float64 .* but float32"),
], ids=["shapes", "dtypes"])
def test_load_state_dict_of_another_model_names_the_tensor_and_changes_nothing(other, match):
    """Same tensor count, other shapes (or dtypes): refused before the inner AdamW would fail mid-step."""
    model, opt = _stepped_adamw(6)
    _loss(model, torch.randn(4, 4)).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    _model_b, opt_b = _stepped_adamw(**other, seed=5)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt_b.param_groups])
    with pytest.raises(ValueError, match=match):
        opt_b.load_state_dict(saved)
    assert (opt_b.steps, opt_b.noise_keys(), len(opt_b.state)) == (0, flashdp.noise.noise_keys(5, 0, False), 0)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt_b.param_groups] == groups_before
    # a state without the recorded specs (e.g. the inner optimizer's own): Adam's moments are checked instead
    inner_only = {k: v for k, v in saved.items() if k != "flashdp"}
    if "dtype" not in other:
        with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 \(0\.weight\) has shape \(6, 4\)"):
            opt_b.load_state_dict(inner_only)
    # and the model it was saved for loads it
    _model_c, opt_c = _stepped_adamw(6, seed=5)
    opt_c.load_state_dict(saved)
    assert opt_c.steps == 1
