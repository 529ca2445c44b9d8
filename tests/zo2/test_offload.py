"""zo2.offload on the CPU engine follows plain ZOSGD's trajectory (losses, projected gradients,
parameters after flush, evaluation logits) within fp32 rounding, on tied OPT, Llama, Qwen2 and GPT-2.

The fused passes of the two runs differ in rounding (a few ulp of θ), which moves a loss by about an
ulp of the loss (~5e-7 at 4.0); g = (L+ - L-)/2ε amplifies that by 1/ε, so parameters are compared with
atol ≈ lr · 2 ulp(L) / ε · |z|max per step."""

import copy

import pytest
import torch

import zo2
from memtrain.testing import assert_close_verbose


def make_batch(seed: int = 1, batch: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def pair(builder, opt_kwargs, offload_kwargs=None, groups_fn=None):
    """The same model twice, one plain and one offloaded, with optimizers of the same seed."""
    plain = builder()
    offloaded = copy.deepcopy(plain)
    params = (lambda m: groups_fn(m)) if groups_fn else (lambda m: m.parameters())
    opt_plain = zo2.ZOSGD(params(plain), **opt_kwargs)
    opt_off = zo2.ZOSGD(params(offloaded), **opt_kwargs)
    engine = zo2.offload(offloaded, opt_off, device="cpu", verbose=False, **(offload_kwargs or {}))
    return plain, opt_plain, offloaded, opt_off, engine


def assert_models_close(model, reference, atol):
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.device.type == "cpu"
        assert_close_verbose(p, q, atol=atol, rtol=0, name=name)


@pytest.mark.parametrize("q", [1, 2])
def test_offloaded_trajectory_matches_plain_zosgd(builders, model_name, q):
    kwargs = dict(lr=2e-3, eps=1e-3, weight_decay=0.05, seed=11, num_perturbations=q)
    plain, opt_plain, offloaded, opt_off, _ = pair(builders[model_name], kwargs)
    batches = [make_batch(s) for s in range(4)]
    for batch in batches:
        loss_plain = opt_plain.step(lambda b=batch: plain(**b).loss)
        loss_off = opt_off.step(lambda b=batch: offloaded(**b).loss)
        assert loss_off.item() == pytest.approx(loss_plain.item(), abs=2e-6)
        assert opt_off.projected_grad == pytest.approx(opt_plain.projected_grad, abs=3e-3)
        assert len(opt_off.projected_grads) == q
    assert opt_off.step_count == opt_plain.step_count == 4
    opt_off.flush()
    assert_models_close(offloaded, plain, atol=1e-5)
    with torch.no_grad():
        logits = offloaded(**batches[0]).logits
        ref = plain(**batches[0]).logits
    assert_close_verbose(logits, ref, atol=1e-4, rtol=0, name="eval logits")


def test_param_groups_and_scheduler_are_followed(make_opt):
    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.ndim == 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "lr": 5e-2, "eps": 2e-3}]

    plain, opt_plain, offloaded, opt_off, _ = pair(make_opt, dict(lr=2e-2, eps=1e-3, seed=5), groups_fn=groups)
    sched_plain = torch.optim.lr_scheduler.StepLR(opt_plain, step_size=1, gamma=0.5)
    sched_off = torch.optim.lr_scheduler.StepLR(opt_off, step_size=1, gamma=0.5)
    for s in range(4):
        batch = make_batch(s)
        opt_plain.step(lambda b=batch: plain(**b).loss)
        opt_off.step(lambda b=batch: offloaded(**b).loss)
        sched_plain.step()
        sched_off.step()  # the deferred update must use the lr of the step that measured g, not the new one
    opt_off.flush()
    assert_models_close(offloaded, plain, atol=1e-5)


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_frozen_parameters_stream_but_are_never_touched(make_opt, amp):
    model = make_opt()
    for name, p in model.named_parameters():
        p.requires_grad_("fc1" in name or "q_proj" in name)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=2)
    zo2.offload(model, opt, device="cpu", amp=amp, verbose=False)
    for s in range(3):
        batch = make_batch(s)
        opt.step(lambda b=batch: model(**b).loss)
    opt.flush()
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert p.dtype == torch.float32 and torch.equal(p, frozen_before[name]), name
    assert opt.projected_grad != 0.0
    with torch.no_grad():
        assert torch.isfinite(model(**make_batch()).logits).all()  # an eval forward after the steps


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_state_dict_observes_flushed_values_and_resume_continues_the_trajectory(make_opt, tmp_path, amp):
    kwargs = dict(lr=2e-3, eps=1e-3, weight_decay=0.01, seed=9)
    plain, opt_plain, offloaded, opt_off, _ = pair(make_opt, kwargs, dict(amp=amp))
    loss_tol, param_tol = (2e-6, 1e-5) if amp is None else (2e-2, 5e-3)
    batches = [make_batch(s) for s in range(5)]
    for batch in batches[:2]:
        opt_plain.step(lambda b=batch: plain(**b).loss)
        opt_off.step(lambda b=batch: offloaded(**b).loss)
    # model.state_dict() flushes on its own: it must hold the same values as the plain run
    saved_model = {k: v.clone() for k, v in offloaded.state_dict().items()}
    # fp32: two steps of fused-pass rounding, well inside a tenth of the 5-step bound. bf16: the loss moves by up
    # to loss_tol, so g by loss_tol/2ε and θ by lr·g·|z| per step; residents are re-cast from the master each
    # half, so that rounding (not the plain run's) decides g: compare with the 5-step bound itself.
    state_tol = param_tol / 10 if amp is None else param_tol
    for k, v in plain.state_dict().items():
        assert_close_verbose(saved_model[k], v, atol=state_tol, rtol=0, name=k)
    torch.save({"model": saved_model, "opt": opt_off.state_dict()}, tmp_path / "ckpt.pt")

    resumed = make_opt(seed=123)  # different init: everything must come from the checkpoint
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = zo2.ZOSGD(resumed.parameters(), **kwargs)
    zo2.offload(resumed, opt_resumed, device="cpu", amp=amp, verbose=False)
    opt_resumed.load_state_dict(ckpt["opt"])
    for batch in batches[2:]:
        a = opt_plain.step(lambda b=batch: plain(**b).loss)
        b_ = opt_off.step(lambda b=batch: offloaded(**b).loss)
        c = opt_resumed.step(lambda b=batch: resumed(**b).loss)
        assert b_.item() == c.item()  # resumed offloaded run == uninterrupted offloaded run, bit for bit
        assert c.item() == pytest.approx(a.item(), abs=loss_tol)
    opt_off.flush()
    opt_resumed.flush()
    for p, q in zip(offloaded.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_models_close(resumed, plain, atol=param_tol)


def test_loading_weights_into_an_offloaded_model_mid_run(make_opt):
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=1)
    zo2.offload(model, opt, device="cpu", verbose=False)
    fresh = make_opt(seed=7).state_dict()
    batch = make_batch()
    opt.step(lambda: model(**batch).loss)
    model.load_state_dict(fresh)  # flushes first, then overwrites: no pending update may land on top
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k


def test_detach_returns_a_plain_model_with_trained_values(make_opt):
    plain, opt_plain, offloaded, opt_off, engine = pair(make_opt, dict(lr=2e-2, seed=4))
    batch = make_batch()
    for _ in range(2):
        opt_plain.step(lambda: plain(**batch).loss)
        opt_off.step(lambda: offloaded(**batch).loss)
    model = engine.detach()
    assert model is offloaded and opt_off.offload_engine is None
    assert_models_close(model, plain, atol=1e-6)
    opt_plain.step(lambda: plain(**batch).loss)
    opt_off.step(lambda: offloaded(**batch).loss)  # plain ZOSGD again
    assert_models_close(model, plain, atol=2e-6)


def test_non_finite_loss_skips_the_step_and_restores(make_opt):
    model = make_opt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=1)
    zo2.offload(model, opt, device="cpu", verbose=False)
    calls = []

    def closure():
        calls.append(1)
        loss = model(**make_batch()).loss
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.warns(zo2.NonFiniteLossWarning):
        opt.step(closure)
    assert opt.skipped_steps == 1 and opt.step_count == 1
    opt.flush()
    for n, p in model.named_parameters():
        assert_close_verbose(p, before[n], atol=1e-6, rtol=0, name=n)


def test_steps_run_without_a_kv_cache(make_opt):
    """A KV cache would hold every block's keys and values on the device for each half: steps turn it off."""
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=0)
    zo2.offload(model, opt, device="cpu", verbose=False)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    batch = make_batch()
    opt.step(lambda: model(**batch, use_cache=True).loss)
    assert seen == [False, False]
    with torch.no_grad():
        model(**batch, use_cache=True)  # evaluation is left alone
    assert seen[-1] is True
