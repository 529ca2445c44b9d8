"""ZOSGD against the textbook MeZO step (float64, z from the independent NumPy Philox), in lock-step."""

import copy

import pytest
import torch

import zo2
import zo2.noise
from memtrain.testing import mezo_step_reference


def unique_params(model):
    return list(model.parameters())  # nn.Module.parameters() already lists a tied weight once


def run_lockstep(model, batch, steps, opt_kwargs, hparams_fn=None, scheduler_fn=None, groups_fn=None):
    """Step ZOSGD (fp32) and the reference (fp64 copy) side by side; return both histories."""
    ref_model = copy.deepcopy(model).double()
    params = groups_fn(model) if groups_fn else model.parameters()
    opt = zo2.ZOSGD(params, **opt_kwargs)
    sched = scheduler_fn(opt) if scheduler_fn else None
    ref_params = unique_params(ref_model)
    streams = list(range(len(ref_params)))
    history = []
    for t in range(steps):
        if hparams_fn:
            hparams = hparams_fn(opt)
        else:
            g = opt.param_groups[0]
            hparams = [(g["lr"], g["eps"], g["weight_decay"])] * len(ref_params)
        loss = opt.step(lambda: model(**batch).loss)
        ref_loss, ref_diffs = mezo_step_reference(
            ref_params, lambda: ref_model(**batch).loss, opt.seeds_for_step(t), streams, hparams,
            dist=opt.distribution,
        )
        history.append((loss.item(), ref_loss, opt.projected_grads, [d / hparams[0][1] for d in ref_diffs]))
        if sched:
            sched.step()
    return opt, ref_model, history


def assert_same_trajectory(model, ref_model, history, param_atol=2e-6):
    for loss, ref_loss, grads, ref_grads in history:
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert grads == pytest.approx(ref_grads, rel=2e-3, abs=2e-3)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.double(), ref, rtol=0, atol=param_atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_matches_textbook_mezo(opt_model, batch, distribution):
    before = copy.deepcopy(opt_model)
    opt, ref, hist = run_lockstep(opt_model, batch, 6, dict(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3,
                                                           distribution=distribution))
    assert_same_trajectory(opt_model, ref, hist)
    moved = max((p - q).abs().max().item() for p, q in zip(opt_model.parameters(), before.parameters(), strict=True))
    assert moved > 1e-4  # the comparison is not vacuous: parameters really moved
    assert opt.step_count == 6


def test_multiple_perturbations_average_at_the_same_point(opt_model, batch):
    opt, ref, hist = run_lockstep(opt_model, batch, 4, dict(lr=1e-2, eps=1e-3, seed=5, num_perturbations=3))
    # three fp32 loss differences per step: the update (~1e-2) carries ~1e-3 relative error
    assert_same_trajectory(opt_model, ref, hist, param_atol=3e-5)
    assert len(opt.projected_grads) == 3
    assert opt.projected_grad == pytest.approx(sum(opt.projected_grads) / 3)


def test_param_groups_with_own_hyperparameters(opt_model, batch):
    def groups(model):
        decoder = [p for n, p in model.named_parameters() if ".layers." in n]
        rest = [p for n, p in model.named_parameters() if ".layers." not in n]
        return [{"params": decoder, "lr": 2e-2, "eps": 2e-3, "weight_decay": 0.05}, {"params": rest}]

    def hparams(opt):
        return [(g["lr"], g["eps"], g["weight_decay"]) for g in opt.param_groups for _ in g["params"]]

    # the reference lists parameters in group order, as the optimizer streams them
    model = opt_model
    names = [n for n, _ in model.named_parameters()]
    order = [n for n in names if ".layers." in n] + [n for n in names if ".layers." not in n]
    ref_model = copy.deepcopy(model).double()
    ref_by_name = dict(ref_model.named_parameters())
    ref_params = [ref_by_name[n] for n in order]
    opt = zo2.ZOSGD(groups(model), lr=1e-2, eps=1e-3, seed=9)
    for t in range(4):
        opt.step(lambda: model(**batch).loss)
        mezo_step_reference(ref_params, lambda: ref_model(**batch).loss, opt.seeds_for_step(t),
                            list(range(len(ref_params))), hparams(opt))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.double(), ref_by_name[n], rtol=0, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_lr_scheduler_drives_the_step(opt_model, batch):
    opt, ref, hist = run_lockstep(
        opt_model, batch, 5, dict(lr=2e-2, eps=1e-3, seed=1),
        scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1),
    )
    assert_same_trajectory(opt_model, ref, hist)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_three_fused_passes_per_step_and_tied_weight_once(opt_model, batch, monkeypatch):
    assert opt_model.lm_head.weight is opt_model.model.decoder.embed_tokens.weight
    calls = []
    real = zo2.noise.zo_perturb_

    def counting(p, seeds, coefs, stream, c, dist):
        calls.append((id(p), stream))
        return real(p, seeds, coefs, stream, c, dist)

    monkeypatch.setattr(zo2.noise, "zo_perturb_", counting)
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-3, seed=0)
    opt.step(lambda: opt_model(**batch).loss)
    n_params = len(list(opt_model.parameters()))
    assert len(calls) == 3 * n_params
    tied = opt_model.lm_head.weight
    assert sum(1 for i, _ in calls if i == id(tied)) == 3
    streams = {s for _, s in calls}
    assert streams == set(range(n_params))


def test_frozen_parameters_are_never_touched(opt_model, batch):
    for p in opt_model.model.decoder.layers[0].parameters():
        p.requires_grad_(False)
    frozen = {n: p.clone() for n, p in opt_model.named_parameters() if not p.requires_grad}
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2, seed=0)
    for _ in range(3):
        opt.step(lambda: opt_model(**batch).loss)
    for n, p in opt_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_resume_continues_the_identical_trajectory(make_opt, batch, tmp_path):
    def run(model, steps, **opt_kwargs):
        opt = zo2.ZOSGD(model.parameters(), **{"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01, "seed": 11, **opt_kwargs})
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=6)
        for _ in range(steps):
            opt.step(lambda: model(**batch).loss)
            sched.step()
        return opt, sched

    full = make_opt()
    opt, _ = run(full, 6)
    first = make_opt()
    opt1, sched1 = run(first, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, path)

    resumed = make_opt(seed=123)  # different init: everything must come from the checkpoint
    opt2, sched2 = run(resumed, 0, lr=5.0, eps=0.5, seed=0)
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for _ in range(3):
        opt2.step(lambda: resumed(**batch).loss)
        sched2.step()
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert opt2.step_count == 6 and opt2.projected_grad == opt.projected_grad


def test_deepcopy_keeps_the_run(opt_model, batch):
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2, seed=7, num_perturbations=2)
    opt.step(lambda: opt_model(**batch).loss)
    clone = copy.deepcopy(opt)
    assert (clone.seed, clone.step_count, clone.num_perturbations) == (7, 1, 2)
    assert clone.seeds_for_step(1) == opt.seeds_for_step(1)


@pytest.mark.parametrize("when", ["plus", "minus"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_and_restores(opt_model, batch, when, bad):
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2, eps=1e-3, seed=0)
    opt.step(lambda: opt_model(**batch).loss)
    before = {n: p.clone() for n, p in opt_model.named_parameters()}
    calls = []

    def closure():
        calls.append(1)
        loss = opt_model(**batch).loss
        return loss * bad if (len(calls) == 1) == (when == "plus") else loss

    with pytest.warns(zo2.NonFiniteLossWarning, match="non-finite loss"):
        opt.step(closure)
    assert opt.skipped_steps == 1 and opt.step_count == 2
    for n, p in opt_model.named_parameters():
        # restored up to the rounding of the perturbation passes (a few fp32 ulp), never left at θ ± εz
        ulp = torch.finfo(torch.float32).eps * before[n].abs().clamp_min(1e-3)
        assert ((p - before[n]).abs() <= 4 * ulp).all(), n
    # training goes on normally afterwards
    loss = opt.step(lambda: opt_model(**batch).loss)
    assert torch.isfinite(loss) and opt.step_count == 3


def params_unchanged(model, before):
    for n, p in model.named_parameters():
        ulp = torch.finfo(torch.float32).eps * before[n].abs().clamp_min(1e-3)
        assert ((p - before[n]).abs() <= 4 * ulp).all(), n


@pytest.mark.parametrize(
    "closure_result,error,match",
    [
        (lambda loss: None, TypeError, "returned None"),
        (lambda loss: loss.expand(3), ValueError, "shape"),
        (lambda loss: "loss", TypeError, "returned str"),
        (lambda loss: loss.detach().requires_grad_(), ValueError, "requires grad"),
    ],
    ids=["none", "non-scalar", "wrong-type", "requires-grad"],
)
def test_bad_closure_results_are_refused_and_nothing_stays_perturbed(opt_model, batch, closure_result, error, match):
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2, seed=0)
    before = {n: p.clone() for n, p in opt_model.named_parameters()}
    with pytest.raises(error, match=match):
        opt.step(lambda: closure_result(opt_model(**batch).loss))
    params_unchanged(opt_model, before)
    assert opt.step_count == 0


def test_closure_exception_restores_parameters(opt_model, batch):
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2, seed=0)
    before = {n: p.clone() for n, p in opt_model.named_parameters()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader failed")
        return opt_model(**batch).loss

    with pytest.raises(RuntimeError, match="data loader failed"):
        opt.step(closure)
    params_unchanged(opt_model, before)


def test_missing_closure():
    opt = zo2.ZOSGD([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def test_dropout_in_training_mode_is_refused(make_opt, batch):
    model = make_opt(dropout=0.1).train()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"dropout is active.*model\.eval\(\)"):
        opt.step(lambda: model(**batch).loss)
    params_unchanged(model, before)
    model.eval()
    opt.step(lambda: model(**batch).loss)  # fine once in eval mode
    quiet = zo2.ZOSGD(make_opt(dropout=0.1).train().parameters(), lr=1e-2, check_dropout=False)
    assert quiet.check_dropout is False


def test_train_mode_without_dropout_is_fine(make_opt, batch):
    model = make_opt().train()  # dropout probabilities are all 0
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=0)
    assert torch.isfinite(opt.step(lambda: model(**batch).loss))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "lr must be"),
        (dict(lr=-1e-3), "lr must be"),
        (dict(eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(num_perturbations=0), "num_perturbations"),
        (dict(distribution="uniform"), "distribution"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zo2.ZOSGD([torch.nn.Parameter(torch.zeros(3))], **{"lr": 1e-3, **kwargs})


def test_bad_group_hyperparameter_set_later(opt_model, batch):
    opt = zo2.ZOSGD(opt_model.parameters(), lr=1e-2)
    opt.param_groups[0]["eps"] = -1.0
    before = {n: p.clone() for n, p in opt_model.named_parameters()}
    with pytest.raises(ValueError, match="param group 0"):
        opt.step(lambda: opt_model(**batch).loss)
    params_unchanged(opt_model, before)


def test_unsupported_parameters():
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        zo2.ZOSGD([torch.zeros(3, dtype=torch.int64)], lr=1e-3)
    with pytest.raises(ValueError, match="on meta"):
        zo2.ZOSGD([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)
    with pytest.raises(ValueError, match="view with strides"):
        zo2.ZOSGD([torch.zeros(4, 4)[:, ::2]], lr=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_low_and_high_precision_models(make_opt, batch, dtype):
    model = make_opt().to(dtype)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=0)
    before = [p.clone() for p in model.parameters()]
    for _ in range(2):
        loss = opt.step(lambda: model(**batch).loss)
    assert torch.isfinite(loss)
    assert all(p.dtype == dtype for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
