"""ZOSGD against the textbook MeZO step in lock-step: a float64 copy of the model, its loss computed by our
own float64 cross-entropy, every z drawn from the independent NumPy Philox with the seed schedule derived
here from SplitMix64's definition (never from the optimizer's own ``seeds_for_step``).

Tolerances, with u = 2^-24 (one float32 rounding moves x by at most u·|x|):

- Loss. The implementation's loss is a float32 forward pass: its logits, log-sum-exp and mean over tokens
  are each rounded, quantities of size ≲ L, so |L32 − L| is a few ulp(L) (ulp(L) = 2^(⌊log2 L⌋−23), 4.8e-7
  at L ≈ 4.1). We allow LOSS_ULPS = 4 ulp(L) per loss (measured: ≤ 1.7 over 200 random points of the tiny
  OPT below).
- Projected gradient. g = (L+ − L−)/2ε, so the two losses' errors move g by up to
  2 · LOSS_ULPS · ulp(L) / (2ε) = LOSS_ULPS · ulp(L) / ε (1.9e-3 at ε = 1e-3).
- Parameters. A g error δg moves every parameter by lr · δg · |z| (up to 1e-2 · 1.9e-3 · 4.5 ≈ 9e-5 per step
  here), which, accumulated over the steps, would hide any bug smaller than that. So once the
  implementation's g has passed the check above, the reference applies its update with that g: the
  directions, the seed schedule, the update rule, ε, lr and weight decay all stay the reference's own, and
  what remains between the two runs is the implementation's float32 arithmetic: per step 2q+1 fused passes,
  each rounding θ once (u · (|θ| + A·|z|max), A the sum of the step's |coefficients|), and its float32 z,
  within Z_ERR of the float64 one (tests/kernels/test_philox.py) plus a product rounding (2u·|z|max), per
  unit of coefficient.
"""

import copy
import math

import pytest
import torch

import zo2
import zo2.noise
from memtrain.testing import (
    SPLITMIX64_KAT,
    causal_lm_loss_float64,
    mezo_estimate,
    mezo_noise,
    mezo_update,
    splitmix64_next,
    zo_step_seeds,
)

U32 = 2.0**-24  # float32 unit roundoff
LOSS_ULPS = 4
Z_ERR = 3e-7  # float32 z against the float64 reference (README, "The noise stream")


def ulp32(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 23)


def stream_order(opt):
    """The optimizer's parameters in stream-id order: group order, a tied weight once (README, Design)."""
    seen, order = set(), []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                order.append((p, group))
    return order


def float64_closure(ref_model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # the model's own loss would cast to float32
    return lambda: causal_lm_loss_float64(ref_model(**inputs).logits, batch["labels"])


class Lockstep:
    """A float64 reference that follows a ZOSGD run step by step and checks each step's loss and g."""

    def __init__(self, model, opt, batch):
        self.opt = opt
        self.ref_model = copy.deepcopy(model).double()
        name_of = {id(p): n for n, p in model.named_parameters()}
        ref_by_name = dict(self.ref_model.named_parameters())
        order = stream_order(opt)
        self.live = [i for i, (p, _) in enumerate(order) if p.requires_grad]  # stream ids of the trained ones
        self.params = [order[i][0] for i in self.live]
        self.names = [name_of[id(p)] for p in self.params]
        self.ref_params = [ref_by_name[n] for n in self.names]
        self.groups = [order[i][1] for i in self.live]
        self.closure = float64_closure(self.ref_model, batch)
        self.steps = 0
        self.atol = 0.0  # accumulated absolute part of the parameter tolerance

    def step(self, closure):
        """One ZOSGD step and one reference step; returns the implementation's loss."""
        opt, t = self.opt, self.opt.step_count
        hparams = [(g["lr"], g["eps"], g["weight_decay"]) for g in self.groups]
        seeds = zo_step_seeds(opt.seed, t, opt.num_perturbations)  # the documented schedule, not the optimizer's
        loss = opt.step(closure).item()
        ref_losses, ref_diffs = mezo_estimate(self.ref_params, self.closure, seeds, list(self.live), hparams,
                                              opt.distribution)
        ref_loss = sum(ref_losses) / len(ref_losses)
        assert abs(loss - ref_loss) <= LOSS_ULPS * ulp32(ref_loss), f"step {t}: loss {loss} vs reference {ref_loss}"
        eps0 = opt.param_groups[0]["eps"]
        ref_grads = [d / eps0 for d in ref_diffs]
        grad_tol = LOSS_ULPS * max(ulp32(x) for x in ref_losses) / eps0
        assert opt.projected_grads == pytest.approx(ref_grads, rel=0, abs=grad_tol), f"step {t}: projected gradients"
        impl_diffs = [g * eps0 for g in opt.projected_grads]
        mezo_update(self.ref_params, impl_diffs, seeds, list(self.live), hparams, opt.distribution)
        zmax = max(z.abs().max().item() for seed in seeds
                   for z in mezo_noise(self.ref_params, seed, list(self.live), opt.distribution))
        q = len(seeds)
        coef = max(4 * q * eps + lr * sum(abs(d) / eps for d in impl_diffs) / q for lr, eps, _ in hparams)
        self.atol += (2 * q + 1) * U32 * coef * zmax + (Z_ERR + 2 * U32 * zmax) * coef
        self.steps += 1
        return loss

    def assert_parameters_match(self):
        rtol = self.steps * (2 * self.opt.num_perturbations + 1) * U32
        for p, ref, name in zip(self.params, self.ref_params, self.names, strict=True):
            torch.testing.assert_close(p.double(), ref, rtol=rtol, atol=self.atol, msg=lambda m, n=name: f"{n}: {m}")


def run_lockstep(model, batch, steps, opt_kwargs, groups_fn=None, scheduler_fn=None):
    """Step ZOSGD (float32) and the float64 reference side by side; check parameters at the end."""
    opt = zo2.ZOSGD(groups_fn(model) if groups_fn else model.parameters(), **opt_kwargs)
    sched = scheduler_fn(opt) if scheduler_fn else None
    lock = Lockstep(model, opt, batch)
    for _ in range(steps):
        lock.step(lambda: model(**batch).loss)
        if sched:
            sched.step()
    lock.assert_parameters_match()
    return opt


def test_reference_seed_schedule_is_splitmix64():
    """The reference's SplitMix64 reproduces the published outputs of splitmix64.c from state 0."""
    state, outputs = 0, []
    for _ in SPLITMIX64_KAT:
        state, out = splitmix64_next(state)
        outputs.append(out)
    assert outputs == list(SPLITMIX64_KAT)
    seeds = [zo_step_seeds(3, t, 2) for t in range(3)]
    assert len({s for step in seeds for s in step}) == 6  # a fresh key for every (step, direction)


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_matches_textbook_mezo(opt_model, batch, distribution):
    before = copy.deepcopy(opt_model)
    opt = run_lockstep(opt_model, batch, 6, dict(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3,
                                                 distribution=distribution))
    moved = max((p - q).abs().max().item() for p, q in zip(opt_model.parameters(), before.parameters(), strict=True))
    assert moved > 1e-4  # the comparison is not vacuous: parameters really moved
    assert opt.step_count == 6


def test_multiple_perturbations_average_at_the_same_point(opt_model, batch):
    opt = run_lockstep(opt_model, batch, 4, dict(lr=1e-2, eps=1e-3, seed=5, num_perturbations=3))
    assert len(opt.projected_grads) == 3
    assert len(set(opt.projected_grads)) == 3  # three directions, not one counted three times
    assert opt.projected_grad == pytest.approx(sum(opt.projected_grads) / 3)


def test_param_groups_with_own_hyperparameters(opt_model, batch):
    def groups(model):
        decoder = [p for n, p in model.named_parameters() if ".layers." in n]
        rest = [p for n, p in model.named_parameters() if ".layers." not in n]
        return [{"params": decoder, "lr": 2e-2, "eps": 2e-3, "weight_decay": 0.05}, {"params": rest}]

    # stream ids follow group order (decoder layers first), which the reference takes from the groups too
    run_lockstep(opt_model, batch, 4, dict(lr=1e-2, eps=1e-3, seed=9), groups_fn=groups)


def test_lr_scheduler_drives_the_step(opt_model, batch):
    opt = run_lockstep(
        opt_model, batch, 5, dict(lr=2e-2, eps=1e-3, seed=1),
        scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1),
    )
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


@pytest.mark.parametrize("when", ["first step", "after training"])
def test_refused_dropout_step_leaves_every_tensor_bit_identical(make_opt, batch, when):
    """The dropout check runs before the first perturbation: nothing moves, not even by one rounding."""
    model = make_opt(dropout=0.1)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=0)
    if when == "after training":
        opt.step(lambda: model(**batch).loss)  # eval mode: fine; then the user switches to train mode
    model.train()
    before = {n: t.clone() for n, t in model.state_dict(keep_vars=True).items()}
    state = (opt.step_count, opt.skipped_steps, opt.projected_grad)
    with pytest.raises(ValueError, match=r"dropout is active.*\(p=0.1\).*model\.eval\(\)"):
        opt.step(lambda: model(**batch).loss)
    after = model.state_dict(keep_vars=True)
    changed = [n for n, t in before.items() if not torch.equal(after[n], t)]
    assert not changed, f"changed by the refused step: {changed}"
    assert (opt.step_count, opt.skipped_steps, opt.projected_grad) == state


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


def test_load_state_dict_of_another_model_names_the_tensor_and_changes_nothing():
    """ZOSGD keeps no per-parameter state, so torch compares nothing: the saved shapes and dtypes are checked."""
    def linear_pair(width, dtype=torch.float32):
        return [torch.nn.Parameter(torch.zeros(width, 4, dtype=dtype)), torch.nn.Parameter(torch.zeros(2, width))]

    saved = zo2.ZOSGD(linear_pair(6), lr=1e-2, seed=1)
    saved.step_count = 9
    sd = saved.state_dict()
    other = zo2.ZOSGD(linear_pair(3), lr=1e-2, seed=2)
    here_and_saved = r"parameter 0 is float32 of shape \(3, 4\) here but float32 of shape \(6, 4\)"
    with pytest.raises(ValueError, match=here_and_saved):
        other.load_state_dict(sd)
    assert (other.seed, other.step_count) == (2, 0)  # another run's seed and step were not taken
    wrong_dtype = zo2.ZOSGD(linear_pair(6, torch.float64), lr=1e-2, seed=2)
    with pytest.raises(ValueError, match=r"float64 of shape \(6, 4\) here but float32"):
        wrong_dtype.load_state_dict(sd)
    same = zo2.ZOSGD(linear_pair(6), lr=1e-2, seed=2)
    same.load_state_dict(sd)
    assert (same.seed, same.step_count) == (1, 9)
