"""ZOSGD's declared contract with the engines that run its steps, and accumulation as a step argument.

- ``begin_step`` / ``finish_step``: the step's record and its accounting, usable without ZOSGD's loop;
- ``attach_engine`` / ``detach_engine`` and the ``StepEngine`` protocol: a minimal engine written
  against the public surface alone trains the same trajectory as plain ZOSGD;
- ``step(accumulate=[c_0, ..., c_{k-1}])``: direction j·q + i is estimated on micro-batch j, bit for bit
  the hand-written loop with k·q directions, with and without offloading.
"""

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import zo2
from zo2.transitions import NoiseState, move


def quadratic_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()


def data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_begin_step_snapshots_the_step_and_changes_nothing():
    model = quadratic_model()
    opt = zo2.ZOSGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "eps": 2e-3}],
                    lr=0.1, weight_decay=0.01, seed=4, num_perturbations=2, distribution="rademacher")
    before = copy.deepcopy(model.state_dict())
    record = opt.begin_step(accumulation=3)
    assert record.step == opt.step_count == 0
    assert record.seeds == opt.seeds_for_step(0, 6) == [zo2.step_seed(4, 0, d) for d in range(6)]
    assert record.hparams == [(0.1, 1e-3, 0.01), (0.1, 2e-3, 0.01)]
    assert record.dist == "rademacher" and record.num_halves == 12 and not record.finished
    opt.param_groups[0]["lr"] = 0.5  # a scheduler stepping later does not change a record already made
    assert record.hparams[0][0] == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="accumulation"):
        opt.begin_step(accumulation=0)


def test_finish_step_counts_a_step_and_skips_a_non_finite_one():
    opt = zo2.ZOSGD([nn.Parameter(torch.zeros(3))], lr=0.1, eps=0.5, num_perturbations=2)
    record = opt.begin_step()
    loss = opt.finish_step(record, [3.0, 2.0, 5.0, 1.0])
    assert loss.item() == 4.0 and record.diffs == [0.5, 2.0]
    assert opt.projected_grads == [1.0, 4.0] and opt.projected_grad == 2.5 and opt.step_count == 1
    with pytest.raises(RuntimeError, match="already finished"):
        opt.finish_step(record, [3.0, 2.0, 5.0, 1.0])
    record = opt.begin_step()
    with pytest.raises(ValueError, match="4 halves but 3"):
        opt.finish_step(record, [3.0, 2.0, 5.0])
    with pytest.warns(zo2.NonFiniteLossWarning, match="L-"):
        loss = opt.finish_step(record, [3.0, 2.0, 7.0, math.inf])  # the list may stop at the bad loss
    assert record.skipped and loss.item() == 7.0
    assert opt.step_count == 2 and opt.skipped_steps == 1 and math.isnan(opt.projected_grad)
    with pytest.warns(zo2.NonFiniteLossWarning, match="L-"):  # an engine reports every half's loss
        loss = opt.finish_step(opt.begin_step(), [3.0, math.nan, 5.0, 1.0])
    assert loss.item() == 3.0  # the L+ of the failed direction, as a step stopped there returns


class DeferringEngine:
    """A minimal engine on the public contract: halves on the parameters where they are, and each step's
    restore and update fused into the next step's first pass (as ZO2's engine does per block)."""

    def __init__(self, opt: zo2.ZOSGD) -> None:
        self.targets = opt.targets()
        self.state = NoiseState()
        self.dropout_flags: list[bool] = []
        opt.attach_engine(self)

    def run_halves(self, record, closures, check_dropout):
        self.dropout_flags.append(check_dropout)
        losses = []
        try:
            for half in range(record.num_halves):
                self.state = move(self.targets, self.state, record, record.half_target(half))
                losses.append(float(closures[half // 2]()))
        except BaseException:
            record.discard()
            self.flush()
            raise
        return losses

    def flush(self) -> None:
        self.state = move(self.targets, self.state, None, {})


def test_an_engine_written_against_the_contract_follows_plain_zosgd():
    """float64 parameters; the fused passes round their fp32 noise increments (~6e-8 relative of ε|z|)
    differently from plain ZOSGD's, which moves g by ~1e-7 relative: parameters agree to 1e-8."""
    plain, deferred = quadratic_model(), quadratic_model()
    kwargs = dict(lr=0.05, eps=1e-3, weight_decay=0.02, seed=3, num_perturbations=2)
    opt_plain, opt_def = zo2.ZOSGD(plain.parameters(), **kwargs), zo2.ZOSGD(deferred.parameters(), **kwargs)
    engine = DeferringEngine(opt_def)
    assert opt_def.offload_engine is engine
    for t in range(4):
        batch = data(t)
        nan_call = 3 if t == 2 else None  # a skipped step in the middle: restored without update

        def closure_for(model, batch=batch, nan_call=nan_call):
            calls = []

            def closure():
                calls.append(1)
                loss = loss_fn(model, batch)
                return loss * math.nan if len(calls) == nan_call else loss

            return closure

        with pytest.warns(zo2.NonFiniteLossWarning) if nan_call else contextlib.nullcontext():
            a = opt_plain.step(closure_for(plain))
            b = opt_def.step(closure_for(deferred))
        # float64 losses: θ agrees to 1e-8, so L (66 parameters, |∂L/∂θ| < 1) agrees to < 66e-8
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, equal_nan=True)
    opt_def.flush()
    for p, q in zip(deferred.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8)
    assert engine.dropout_flags == [True] * 4 and opt_def.step_count == 4 and opt_def.skipped_steps == 1
    with pytest.raises(RuntimeError, match="already attached"):
        opt_def.attach_engine(engine)
    opt_def.detach_engine()
    assert opt_def.offload_engine is None
    assert copy.deepcopy(opt_plain).offload_engine is None


def manual_accumulation(model, micro, q, seed, steps):
    """The loop ZOTrainer used to run: k·q directions, calls 2d and 2d+1 on micro-batch d // q."""
    opt = zo2.ZOSGD(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.01, seed=seed,
                    num_perturbations=q * len(micro[0]))
    for t in range(steps):
        calls = iter(range(10**6))
        opt.step(lambda t=t, calls=calls: loss_fn(model, micro[t][(next(calls) // 2) // q]))
    return opt


@pytest.mark.parametrize(("q", "k"), [(1, 2), (2, 3)])
def test_accumulate_estimates_direction_jq_plus_i_on_micro_batch_j(q, k):
    model, reference = quadratic_model(), quadratic_model()
    micro = [[data(10 * t + j) for j in range(k)] for t in range(3)]
    opt = zo2.ZOSGD(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.01, seed=6, num_perturbations=q)
    order = []
    for t in range(3):
        closures = [lambda j=j, t=t: order.append(j) or loss_fn(model, micro[t][j]) for j in range(k)]
        opt.step(accumulate=closures)
    assert order[: 2 * k * q] == [j for j in range(k) for _ in range(2 * q)]  # 2 calls per direction
    ref_opt = manual_accumulation(reference, micro, q, seed=6, steps=3)
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)
    assert opt.projected_grads == ref_opt.projected_grads and len(opt.projected_grads) == k * q
    assert opt.num_perturbations == q  # the option is never rewritten


def test_accumulate_with_offload_calls_each_closure_once_per_half():
    """Offloaded, each micro-batch's closure runs 2q halves, each calling the model once; the trajectory
    follows plain accumulation within the engine's float64 rounding (see the engine test above)."""
    model, plain = quadratic_model(), quadratic_model()
    opt = zo2.ZOSGD(model.parameters(), lr=0.05, eps=1e-3, seed=2, num_perturbations=2)
    zo2.offload(model, opt, device="cpu", blocks=[model[0], model[2]], verbose=False)
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=0.05, eps=1e-3, seed=2, num_perturbations=2)
    calls = []
    for t in range(3):
        micro = [data(10 * t + j) for j in range(3)]
        opt.step(accumulate=[lambda j=j, b=b: calls.append(j) or loss_fn(model, b) for j, b in enumerate(micro)])
        opt_plain.step(accumulate=[lambda b=b: loss_fn(plain, b) for b in micro])
    assert sorted(calls[:12]) == [j for j in range(3) for _ in range(4)]
    opt.flush()
    for p, r in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(closure=lambda: 1.0, accumulate=[lambda: 1.0]), "not both"),
    (dict(accumulate=[]), "non-empty sequence"),
    (dict(accumulate=[lambda: 1.0, "loss"]), "non-empty sequence of closures"),
    (dict(), "needs a closure"),
])
def test_bad_step_arguments(kwargs, match):
    p = nn.Parameter(torch.zeros(3))
    opt = zo2.ZOSGD([p], lr=0.1)
    with pytest.raises(TypeError, match=match):
        opt.step(**kwargs)
    assert opt.step_count == 0 and torch.equal(p, torch.zeros(3))
