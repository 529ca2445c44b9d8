"""zo2.DPZOSGD under zo2.offload (CPU engine) follows the in-place DPZOSGD: both halves return per-sample
vectors and only the clipped, noised scalars decide the update.

As for ZOSGD (tests/zo2/test_offload.py), the fused passes of the two runs round θ differently by a few
ulp, which moves each per-sample loss by about an ulp of the loss (~5e-7 at 4.0) and each d_i by
2 ulp(L)/2ε. Clipping is 1-Lipschitz and the noise is the same, so g moves by at most that (|Σ_i δd_i|/B_exp
with B ≤ B_exp): parameters are compared with atol ≈ lr · 2 ulp(L)/ε · |z|max per step
(1e-2 · 1e-3 · 5 = 5e-5 over 3 steps; we allow 1e-5 as test_offload.py, |z|max over these tiny models ≈ 4)."""

import copy

import pytest
import torch

import zo2
from memtrain.testing import assert_close_verbose


def make_batch(seed: int, batch: int = 4, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def dp(model, **kwargs):
    return zo2.DPZOSGD(model.parameters(), lr=1e-2, eps=1e-3, max_grad_norm=0.05, noise_multiplier=0.8,
                       expected_batch_size=5, seed=7, **kwargs)


def closure_for(model, batch, nan_call=None):
    calls = []

    def closure():
        calls.append(1)
        call = len(calls)  # counted before the forward: offloaded halves run their blocks interleaved
        losses = zo2.per_sample_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        if call == nan_call:
            losses[1] = float("nan")
        return losses

    return closure


@pytest.mark.parametrize("q", [1, 2])
def test_offloaded_dpzo_matches_in_place(make_opt, q):
    plain = make_opt()
    offloaded = copy.deepcopy(plain)
    opt_plain, opt_off = dp(plain, num_perturbations=q), dp(offloaded, num_perturbations=q)
    zo2.offload(offloaded, opt_off, device="cpu", verbose=False)
    for t in range(4):
        batch = make_batch(t)
        nan_call = 2 if t == 2 else None  # a skipped step: restored, not accounted
        if nan_call:
            with pytest.warns(zo2.NonFiniteLossWarning):
                opt_plain.step(closure_for(plain, batch, nan_call))
            with pytest.warns(zo2.NonFiniteLossWarning):
                opt_off.step(closure_for(offloaded, batch, nan_call))
            continue
        loss_plain = opt_plain.step(closure_for(plain, batch))
        loss_off = opt_off.step(closure_for(offloaded, batch))
        assert loss_off.item() == pytest.approx(loss_plain.item(), abs=1e-5)
        assert opt_off.projected_grads == pytest.approx(opt_plain.projected_grads, abs=2e-3)
    assert opt_off.skipped_steps == opt_plain.skipped_steps == 1
    opt_off.flush()
    for (name, p), r in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        assert_close_verbose(p, r, atol=1e-5, rtol=0, name=name)


def test_scalar_closure_under_offload_is_refused_and_leaves_the_model_flushed(make_opt):
    model = make_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = dp(model)
    engine = zo2.offload(model, opt, device="cpu", verbose=False)
    batch = make_batch(0)
    with pytest.raises(ValueError, match="reduction='none'"):
        opt.step(lambda: model(**batch).loss)
    assert not engine.dirty and not engine.resident_slot
    for k, v in model.state_dict().items():  # the perturb and flip passes round θ by a few ulp
        assert_close_verbose(v, before[k], atol=1e-6, rtol=0, name=k)
