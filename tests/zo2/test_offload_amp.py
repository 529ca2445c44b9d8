"""AMP offloading: fp32 master on the host, bf16/fp16 on the bus and in the compute, updates on the master.

References: plain fp32 ZOSGD for the losses (within bf16 tolerance), and a float64 replay of the engine's
own projected gradients with z from the NumPy Philox reference for the master (within fp32 rounding)."""

import copy

import pytest
import torch

import zo2
from memtrain.testing import assert_close_verbose, philox_noise_numpy


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_losses_follow_fp32_within_low_precision_tolerance(builders, model_name, amp):
    plain = builders[model_name]()
    offloaded = copy.deepcopy(plain)
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=1e-3, eps=1e-2, seed=4)
    opt_off = zo2.ZOSGD(offloaded.parameters(), lr=1e-3, eps=1e-2, seed=4)
    zo2.offload(offloaded, opt_off, device="cpu", amp=amp, verbose=False)
    for s in range(3):
        batch = make_batch(s)
        a = opt_plain.step(lambda b=batch: plain(**b).loss).item()
        b_ = opt_off.step(lambda b=batch: offloaded(**b).loss).item()
        assert b_ == pytest.approx(a, rel=2e-2)
    opt_off.flush()
    assert all(p.dtype == torch.float32 for p in offloaded.parameters())  # observers see the fp32 master
    for p, q in zip(offloaded.parameters(), plain.parameters(), strict=True):
        assert_close_verbose(p, q, atol=5e-3, rtol=0, name="master")
    with torch.no_grad():
        logits = offloaded(**make_batch()).logits.float()
        ref = plain(**make_batch()).logits
    assert_close_verbose(logits, ref, atol=0.15, rtol=0.05, name="eval logits")


def replay(initial, opt, seeds_and_grads, lr, wd):
    """θ_T from θ_0 with the recorded (seed, g) of each step, z from the NumPy reference: in float64, and
    as a bf16 store that rounds to nearest after every step (what a low-precision master would hold)."""
    exact, bf16_store = {}, {}
    for stream, (p, _) in enumerate(opt.unique_params()):
        theta = initial[id(p)].double().flatten()
        low = theta.to(torch.bfloat16)
        for seed, g in seeds_and_grads:
            z = torch.from_numpy(philox_noise_numpy(seed, stream, theta.numel()))
            theta = theta - lr * (g * z + wd * theta)
            low = (low.double() - lr * (g * z + wd * low.double())).to(torch.bfloat16)
        exact[id(p)] = theta.view(p.shape)
        bf16_store[id(p)] = low.view(p.shape)
    return exact, bf16_store


def test_sub_ulp_updates_accumulate_in_the_fp32_master(make_opt):
    """lr·g·z is far below half a bf16 ulp of θ: a bf16 store would not move, the fp32 master does, and
    it matches a float64 replay of the same updates."""
    model = make_opt()
    lr, wd = 1e-6, 0.0
    opt = zo2.ZOSGD(model.parameters(), lr=lr, eps=1e-2, weight_decay=wd, seed=8)
    initial = {id(p): p.detach().clone() for p in model.parameters()}
    zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False)
    history = []
    for s in range(6):
        batch = make_batch(s)
        opt.step(lambda b=batch: model(**b).loss)
        history.append((opt.seeds_for_step(s)[0], opt.projected_grad))
    assert max(abs(g) for _, g in history) > 0
    opt.flush()
    exact, bf16_store = replay(initial, opt, history, lr, wd)
    moved = total = 0
    for p in model.parameters():
        before = initial[id(p)]
        big = before.abs() > 1e-2  # there every update is below half a bf16 ulp (2^-9 |θ| > 1.9e-5)
        assert torch.equal(bf16_store[id(p)][big], before.to(torch.bfloat16)[big]), "a bf16 store moved"
        moved += int((p.detach() != before)[big].sum())
        total += int(big.sum())
        assert_close_verbose(p, exact[id(p)].float(), atol=2e-7, rtol=2e-7, name="master vs float64 replay")
    assert total > 0 and moved > 0.9 * total


def test_host_thread_preparation_matches_inline(make_opt):
    """On CUDA the AMP master updates run on a host thread ahead of the uploads; the result is the same."""
    from concurrent.futures import ThreadPoolExecutor

    runs = []
    for threaded in (False, True):
        model = make_opt(num_hidden_layers=3)
        opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=2)
        engine = zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False)
        if threaded:
            engine.streamer.host_pool = ThreadPoolExecutor(1)
        losses = []
        for s in range(3):
            batch = make_batch(s)
            losses.append(opt.step(lambda m=model, b=batch: m(**b).loss).item())
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
        engine.detach()
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_amp_steps_update_the_master_and_cast_the_wire_in_one_pass(make_opt, monkeypatch):
    """From the second step on, each block's host pass is the fused update-and-cast pass (one call with
    out= per trained tensor, no separate cast), writing the new master's cast into a staging slot."""
    import zo2.noise

    calls = []
    real = zo2.noise.zo_perturb_

    def spy(p, *args, out=None, **kwargs):
        result = real(p, *args, out=out, **kwargs)
        if out is not None:  # the wire copy it leaves is the updated master, rounded to nearest
            calls.append(torch.equal(out, p.to(out.dtype)))
        return result

    monkeypatch.setattr(zo2.noise, "zo_perturb_", spy)
    model = make_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=2)
    engine = zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False)
    opt.step(lambda: model(**make_batch(0)).loss)
    casts = [s.casts for s in engine.stores]
    fused_before = len(calls)
    opt.step(lambda: model(**make_batch(1)).loss)
    trained = sum(len(s.params) for s in engine.stores)
    assert len(calls) - fused_before == trained  # every trained block tensor: update + cast in one pass
    assert all(calls)
    assert [s.casts for s in engine.stores] == [c + 1 for c in casts]  # and no second cast of the block


@pytest.mark.parametrize("threaded", [False, True])
def test_host_pass_runs_under_the_host_threads_bound(make_opt, threaded):
    """zo2.offload(host_threads=k): every host pass (inline, or on the host thread as on CUDA) runs with the
    C++ kernels bounded to k threads in the thread that runs it, and the bound does not leak out of it."""
    from concurrent.futures import ThreadPoolExecutor

    from memtrain.kernels.zo_perturb import current_cpu_threads

    model = make_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=2)
    engine = zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False, host_threads=3)
    if threaded:
        engine.streamer.host_pool = ThreadPoolExecutor(1)
    seen = []
    real = engine.streamer.prepare
    engine.streamer.prepare = lambda b, wire: (seen.append(current_cpu_threads()), real(b, wire))
    for s in range(2):
        batch = make_batch(s)
        opt.step(lambda b=batch: model(**b).loss)
    with torch.no_grad():
        model(**make_batch(0))  # an evaluation forward's casts too
    assert seen == [3] * (3 * 2 + 3)
    assert current_cpu_threads() is None
    engine.streamer.host_threads = None  # settable between steps
    opt.step(lambda: model(**make_batch(2)).loss)
    assert seen[-3:] == [None] * 3


def test_host_threads_default_and_refusals(make_opt, monkeypatch):
    from zo2.streamer import default_host_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert default_host_threads(torch.device("cuda", 0)) == 15  # one core for the launching thread
    assert default_host_threads(torch.device("cpu")) is None  # inline: torch's threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_host_threads(torch.device("cuda", 0)) == 1
    monkeypatch.undo()
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3)
    assert zo2.offload(model, opt, device="cpu", amp="bf16", verbose=False).streamer.host_threads is None
    for bad in (0, True, 2.5):
        model = make_opt()
        with pytest.raises(ValueError, match="host_threads must be an int >= 1"):
            zo2.offload(model, zo2.ZOSGD(model.parameters(), lr=1e-3), device="cpu", amp="bf16", verbose=False,
                        host_threads=bad)
