"""zo2.offload on a CUDA device (skipped without one): same trajectory as plain ZOSGD on the GPU, and the
device holds only the resident modules, the ring and the activations."""

import copy

import pytest
import torch

import zo2
from memtrain.testing import assert_close_verbose

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_cuda_offload_follows_plain_zosgd(builders, model_name, amp):
    host = builders[model_name]()
    plain = copy.deepcopy(host).cuda()
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=2e-3, eps=1e-2, seed=6)
    opt_off = zo2.ZOSGD(host.parameters(), lr=2e-3, eps=1e-2, seed=6)
    engine = zo2.offload(host, opt_off, device="cuda", amp=amp, prefetch=1, trace=True, verbose=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 61, (2, 9), generator=g).cuda()
        a = opt_plain.step(lambda ids=ids: plain(input_ids=ids, labels=ids).loss).item()
        b = opt_off.step(lambda ids=ids: host(input_ids=ids, labels=ids).loss).item()
        assert b == pytest.approx(a, abs=2e-5 if amp is None else 2e-2 * abs(a))
    opt_off.flush()
    for p, q in zip(host.parameters(), plain.parameters(), strict=True):
        assert_close_verbose(p.cpu(), q.cpu(), atol=1e-4 if amp is None else 5e-3, rtol=0, name="param")
    uploads = [e for e in engine.trace if e.op == "upload" and e.step == 2]
    assert len(uploads) == len(engine.blocks)


def test_device_memory_is_resident_plus_ring_plus_activations(make_opt):
    model = make_opt(hidden_size=256, ffn_dim=1024, num_hidden_layers=8, num_attention_heads=4,
                     word_embed_proj_dim=256, vocab_size=1000)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = zo2.ZOSGD(model.parameters(), lr=1e-4, seed=0)
    engine = zo2.offload(model, opt, device="cuda", prefetch=1, verbose=False)
    ids = torch.randint(0, 1000, (1, 16), device="cuda")
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    peak = torch.cuda.max_memory_allocated()
    activations = engine.plan.activation_bytes(1, 16)
    assert peak < engine.plan.device_bytes + activations + 8 * 2**20
    assert engine.plan.device_bytes < total


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_cuda_copy_stream_delays_leave_the_trajectory_unchanged(make_opt, amp, prefetch):
    """torch.cuda._sleep on the copy streams before each copy (zo2.copy_executor.random_cuda_spins): a
    missing event wait lets the compute read a slot mid-upload or an upload overwrite a slot mid-offload.
    Reference: the same engine without delays, bit for bit."""
    from zo2.copy_executor import inject_copy_delays, random_cuda_spins

    base = make_opt(num_hidden_layers=4)
    runs = []
    for delays in (False, True):
        host = copy.deepcopy(base)
        opt = zo2.ZOSGD(host.parameters(), lr=2e-3, eps=1e-2, seed=6)
        engine = zo2.offload(host, opt, device="cuda", amp=amp, prefetch=prefetch, verbose=False)
        if delays:
            inject_copy_delays(engine, random_cuda_spins(seed=prefetch, max_cycles=2_000_000))  # ~1 ms
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(4):
            ids = torch.randint(0, 61, (2, 9), generator=g).cuda()
            losses.append(opt.step(lambda ids=ids, m=host: m(input_ids=ids, labels=ids).loss).item())
        opt.flush()
        runs.append((losses, [p.detach().cpu().clone() for p in host.parameters()]))
        engine.detach()
    assert runs[0][0] == runs[1][0]
    for p, q in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_only_what_crosses_the_bus_is_pinned_at_its_planned_size(make_opt, amp):
    model = make_opt(num_hidden_layers=3)
    engine = zo2.offload(model, zo2.ZOSGD(model.parameters(), lr=1e-3), device="cuda", amp=amp, verbose=False)
    pinned = pageable = 0
    buffers = engine.streamer.host_buffers()
    assert [role for role, _ in buffers].count("staging") == (3 if amp else 0)  # prefetch 1: ring of 2 + 1
    for role, flat in buffers:
        assert flat.is_pinned() == (role == "staging" or amp is None)  # the fp32 master never crosses the bus
        n = flat.untyped_storage().nbytes()
        pinned, pageable = (pinned + n, pageable) if flat.is_pinned() else (pinned, pageable + n)
    assert (engine.plan.pinned_host_bytes, engine.plan.pageable_host_bytes) == (pinned, pageable)


def test_cuda_amp_host_pass_leaves_the_launching_thread_a_core(make_opt):
    """On CUDA the AMP host pass runs on the host thread with the C++ kernels bounded to torch's thread count
    less one (zo2.offload(host_threads=None)); the trajectory is the same bits with every bound."""
    from memtrain.kernels.zo_perturb import current_cpu_threads

    base = make_opt(num_hidden_layers=3)
    runs = []
    for host_threads in (None, 1):
        host = copy.deepcopy(base)
        opt = zo2.ZOSGD(host.parameters(), lr=2e-3, eps=1e-2, seed=6)
        engine = zo2.offload(host, opt, device="cuda", amp="bf16", verbose=False, host_threads=host_threads)
        seen = []
        real = engine.streamer.prepare
        engine.streamer.prepare = lambda b, wire, real=real, seen=seen: (seen.append(current_cpu_threads()),
                                                                         real(b, wire))
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            ids = torch.randint(0, 61, (2, 9), generator=g).cuda()
            losses.append(opt.step(lambda ids=ids, m=host: m(input_ids=ids, labels=ids).loss).item())
        opt.flush()
        assert seen == [host_threads or max(1, torch.get_num_threads() - 1)] * (3 * 3)
        runs.append((losses, [p.detach().cpu().clone() for p in host.parameters()]))
        engine.detach()
    assert runs[0][0] == runs[1][0]
    for p, q in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(p, q)
