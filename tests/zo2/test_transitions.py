"""The noise state machine (zo2.transitions) against the textbook MeZO step, in float64.

``memtrain.testing.mezo_step_reference`` stores every z (from the independent NumPy Philox) and runs
Malladi et al.'s four passes per direction; its closure is called at θ+εz_0, θ-εz_0, θ+εz_1, ... and we
keep a copy of the parameters at each call. Here each pass that :func:`zo2.transitions.transition`
describes is applied in float64 with the same NumPy z, so the comparison checks the algebra (which
seeds, which coefficients, which decay, and whose ε and lr), not the kernels' fp32 rounding: both sides
are exact to a few float64 ulp of |θ| + ε|z| (~1e-15), and the tolerance is 1e-12.

Also pinned: the pass structure of a plain ZOSGD step (2q + 1 passes with 1, 1, 2, 1, 2, ..., q terms)
and the exact coefficients of its finishing pass, which decide the fp32 trajectory bit for bit.
"""

import numpy as np
import pytest
import torch

import zo2
import zo2.noise
from memtrain.testing import mezo_step_reference, philox_noise_numpy
from zo2.transitions import NoiseState, StepRecord, Target, move, transition

SHAPES = [(7,), (3, 5), (1,), (33, 4)]
GROUP_OF = [0, 1, 0, 1]  # parameter i belongs to param group GROUP_OF[i]
ATOL = 1e-12


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def apply64(p: torch.Tensor, stream: int, seeds, coefs, decay: float, dist: str) -> None:
    """The pass p ← p + Σ a_j z(seed_j) + c·p in float64, z from the NumPy reference."""
    noise = sum((a * torch.from_numpy(philox_noise_numpy(s, stream, p.numel(), 0, dist)).view(p.shape)
                 for s, a in zip(seeds, coefs, strict=True)), torch.zeros_like(p))
    p.add_(noise + decay * p)


def step_through(params, state, record, dist):
    """Walk ``record``'s halves from ``state`` with the transitions; return the state and a copy of the
    parameters at each half."""
    seen = []
    for half in range(record.num_halves):
        for i, p in enumerate(params):
            apply64(p, i, *transition(state, record, record.half_target(half), GROUP_OF[i]), dist)
        state = NoiseState(record, record.half_target(half))
        seen.append([p.clone() for p in params])
    return state, seen


def finish(params, state, record, target, dist):
    for i, p in enumerate(params):
        apply64(p, i, *transition(state, record, target, GROUP_OF[i]), dist)
    return NoiseState(record, dict(target)) if record is not None else NoiseState()


def reference_step(ref, seeds, hparams, dist):
    """One textbook step on ``ref`` (in place); returns the diffs and the parameters at each closure call."""
    weights = make_params(seed=99)
    seen = []

    def closure():
        seen.append([p.clone() for p in ref])
        return sum((w * torch.sin(p) + 0.5 * p * p).sum() for w, p in zip(weights, ref, strict=True))

    per_param = [hparams[GROUP_OF[i]] for i in range(len(ref))]
    _, diffs = mezo_step_reference(ref, closure, seeds, list(range(len(ref))), per_param, dist=dist)
    return diffs, seen


def assert_all_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL, msg=lambda m, i=i: f"{what}, parameter {i}: {m}")


# per step: hyperparameters of group 0 and group 1, as a scheduler would change them between steps
SCHEDULE = [[(0.05, 1e-3, 0.1), (0.2, 3e-3, 0.0)],
            [(0.025, 2e-3, 0.1), (0.1, 3e-3, 0.0)],
            [(0.0125, 2e-3, 0.3), (0.05, 1e-3, 0.05)]]


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("fused", [False, True], ids=["finish-to-clean", "finish-fused-with-next-perturb"])
def test_halves_and_finish_match_the_textbook_step(q, dist, fused):
    """Every half's state and the updated θ after each of three steps, with the update finished to clean
    θ (plain ZOSGD) or fused into the next step's first perturbation (the offload engine)."""
    params, ref = make_params(), make_params()
    state = NoiseState()
    for t, hparams in enumerate(SCHEDULE):
        seeds = [zo2.step_seed(5, t, k) for k in range(q)]
        diffs, ref_seen = reference_step(ref, seeds, hparams, dist)
        record = StepRecord(t, seeds, hparams, dist)
        # fused, the first half's pass leaves the previous step: its finish and this step's +εz_0 in one
        state, seen = step_through(params, state, record, dist)
        for half, (got, want) in enumerate(zip(seen, ref_seen, strict=True)):
            assert_all_close(got, want, f"step {t} half {half}")
        record.diffs = diffs
        if not fused or t == len(SCHEDULE) - 1:
            state = finish(params, state, None, {}, dist)
            assert state.clean
            assert_all_close(params, ref, f"step {t} updated θ")


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3])
def test_skipped_step_restores_without_update(stop_after):
    """From any half of a step, a skipped (or abandoned) record returns θ unchanged, then the next step
    proceeds from it; lr and decay of the skipped step are not applied."""
    params, ref = make_params(), make_params()
    hparams = SCHEDULE[0]
    record = StepRecord(0, [zo2.step_seed(1, 0, k) for k in range(2)], hparams)
    state = NoiseState()
    for half in range(stop_after + 1):
        state = finish(params, state, record, record.half_target(half), "normal")
    record.discard()
    assert record.skipped and record.finished
    state = finish(params, state, None, {}, "normal")
    assert state.clean
    assert_all_close(params, ref, "after the skipped step")


def test_master_owes_the_update_of_a_finished_step():
    """The AMP master's state (record, no noise applied) finishes to the textbook update of θ."""
    params, ref = make_params(), make_params()
    seeds = [zo2.step_seed(2, 0, k) for k in range(2)]
    diffs, _ = reference_step(ref, seeds, SCHEDULE[1], "normal")
    record = StepRecord(0, seeds, SCHEDULE[1], diffs=diffs)
    state = finish(params, NoiseState(record, {}), None, {}, "normal")
    assert state.clean
    assert_all_close(params, ref, "master after its deferred update")


def test_leaving_a_running_step_is_refused():
    record = StepRecord(0, [1, 2], SCHEDULE[0])
    state = NoiseState(record, {1: 1.0})
    with pytest.raises(RuntimeError, match="still running"):
        transition(state, None, {}, 0)
    with pytest.raises(RuntimeError, match="distributions"):
        move([], NoiseState(StepRecord(0, [1], SCHEDULE[0], "normal", diffs=[0.1])),
             StepRecord(1, [3], SCHEDULE[0], "rademacher"), {3: 1.0})


def test_finish_coefficients_are_the_zosgd_formula_bit_for_bit():
    """The finishing pass of a plain step: a_k = -lr·d_k/(ε·q), plus ε·(1 - lr·wd) on the held direction,
    decay -lr·wd, terms in the step's seed order (the fp32 trajectory depends on these exact floats)."""
    lr, eps, wd, q = 0.037, 1.3e-3, 0.07, 3
    diffs = [0.11, -0.023, 0.0071]
    record = StepRecord(4, [11, 12, 13], [(lr, eps, wd)], diffs=diffs)
    seeds, coefs, decay = transition(NoiseState(record, {13: -1.0}), None, {}, 0)
    expected = [-lr * d / (eps * q) for d in diffs]
    expected[-1] += eps * (1.0 - lr * wd)
    assert seeds == [11, 12, 13]
    assert coefs == expected  # exact float equality
    assert decay == -lr * wd
    # within a step: the flip is -2ε and the next direction +ε on both seeds, held seed first
    assert transition(NoiseState(record, {11: 1.0}), record, {11: -1.0}, 0) == ([11], [-2.0 * eps], 0.0)
    assert transition(NoiseState(record, {11: -1.0}), record, {12: 1.0}, 0) == ([11, 12], [eps, eps], 0.0)


@pytest.mark.parametrize("q", [1, 2, 3])
def test_zosgd_step_is_2q_plus_1_passes(q, monkeypatch):
    """Per tensor and step: perturb (1 term), flip (1), next direction (2), ..., finish (q terms)."""
    params = [torch.nn.Parameter(p.float()) for p in make_params()]
    calls = []
    real = zo2.noise.zo_perturb_

    def counting(p, seeds, coefs, stream, c, dist, **kw):
        calls.append((stream, len(seeds), c != 0.0))
        return real(p, seeds, coefs, stream, c, dist, **kw)

    monkeypatch.setattr(zo2.noise, "zo_perturb_", counting)
    opt = zo2.ZOSGD(params, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=0, num_perturbations=q)
    opt.step(lambda: sum((p.double() ** 2).sum() for p in params))
    terms = [1, 1] + [2, 1] * (q - 1) + [q]
    for stream in range(len(params)):
        mine = [(n, decays) for s, n, decays in calls if s == stream]
        assert [n for n, _ in mine] == terms
        assert [d for _, d in mine] == [False] * (2 * q) + [True]  # only the finish applies the decay


def test_a_shard_draws_its_part_of_the_parameter_stream():
    """A Target with an offset (a shard of a larger parameter) is moved exactly like that slice of the
    whole parameter: z is indexed by the global element offset."""
    whole = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    shards = [whole[:317].clone(), whole[317:].clone()]
    record = StepRecord(0, [zo2.step_seed(8, 0, 0)], [(0.1, 1e-3, 0.0)])
    move([Target(whole, 5, 0)], NoiseState(), record, {record.seeds[0]: 1.0})
    move([Target(shards[0], 5, 0, 0), Target(shards[1], 5, 0, 317)], NoiseState(), record, {record.seeds[0]: 1.0})
    assert torch.equal(torch.cat(shards), whole)
    assert np.isfinite(whole.numpy()).all()
