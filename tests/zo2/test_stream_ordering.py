"""Stream ordering on the CPU: the ring's copies run on their own worker threads (one upload and one
offload stream, :class:`zo2.copy_executor.AsyncCopyExecutor`) with seeded random delays before each copy,
so a missing wait (compute before its upload, an upload into a slot before its previous offload, an upload
before the block's last copy-back) reads or overwrites a slot mid-copy and the trajectory goes wrong.

References: the same engine with synchronous copies, bit for bit (the copies move bytes; correct ordering
makes the schedule's arithmetic identical), and plain ZOSGD within the tolerances test_offload derives
(native: loss within 2 ulp-scale 2e-6, parameters 1e-5; AMP: bf16 tolerances of test_offload_amp)."""

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import zo2
from memtrain.testing import assert_close_verbose
from zo2.copy_executor import inject_copy_delays, random_sleeps, use_async_copies

from .conftest import tiny_llama, tiny_opt


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    return {"input_ids": ids, "labels": ids}


# (upload, offload) maximum delays in seconds: even, and offloads slow enough that a block's copy-back is
# still in flight when the next step uploads it again
DELAYS = {"even": (2e-3, 2e-3), "slow_offload": (0.0, 8e-3)}
SLOW_UPLOAD = (8e-3, 0.0)  # uploads slow enough that the host pass ahead reaches their staging slot first


def run(model, amp, prefetch, delays, steps=4, host_thread=False):
    """Losses and flushed parameters of ``steps`` offloaded steps (async delayed copies when ``delays``;
    AMP's host pass on a host thread ahead of the uploads, as on CUDA, when ``host_thread``)."""
    opt = zo2.ZOSGD(model.parameters(), lr=2e-3, eps=1e-2 if amp else 1e-3, weight_decay=0.05, seed=11)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, prefetch=prefetch, verbose=False)
    if host_thread:
        engine.streamer.host_pool = ThreadPoolExecutor(1, thread_name_prefix="zo2-host")
    if delays:
        use_async_copies(engine)
        inject_copy_delays(engine, random_sleeps(prefetch, *(SLOW_UPLOAD if delays == "slow_upload"
                                                             else DELAYS[delays])))
    batches = [make_batch(s) for s in range(steps)]
    losses = [opt.step(lambda b=b: model(**b).loss).item() for b in batches]
    opt.flush()
    with torch.no_grad():
        eval_logits = model(**make_batch(0)).logits.float()
    params = [p.detach().clone() for p in model.parameters()]
    engine.detach()
    return losses, params, eval_logits


def plain_run(model, amp, steps=4):
    opt = zo2.ZOSGD(model.parameters(), lr=2e-3, eps=1e-2 if amp else 1e-3, weight_decay=0.05, seed=11)
    batches = [make_batch(s) for s in range(steps)]
    losses = [opt.step(lambda b=b: model(**b).loss).item() for b in batches]
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("builder", [tiny_opt, tiny_llama], ids=["opt", "llama"])
@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("delays", sorted(DELAYS))
def test_delayed_async_copies_follow_plain_zosgd(builder, amp, prefetch, delays):
    # OPT has 2 blocks, Llama 3: at prefetch 2 the ring (3 slots) outnumbers OPT's blocks, so a block's
    # next upload lands in a slot other than the one it left and only the copy-back event orders them
    base = builder()
    sync_losses, sync_params, sync_logits = run(copy.deepcopy(base), amp, prefetch, delays=None)
    losses, params, logits = run(copy.deepcopy(base), amp, prefetch, delays=delays)
    assert losses == sync_losses  # correct ordering: the same bytes reach the compute, bit for bit
    for p, q in zip(params, sync_params, strict=True):
        assert torch.equal(p, q)
    assert torch.equal(logits, sync_logits)

    ref_losses, ref_params = plain_run(copy.deepcopy(base), amp)
    loss_tol, param_tol = (2e-6, 1e-5) if amp is None else (2e-2 * max(ref_losses), 5e-3)
    for a, b in zip(losses, ref_losses, strict=True):
        assert a == pytest.approx(b, abs=loss_tol)
    for p, q in zip(params, ref_params, strict=True):
        assert_close_verbose(p, q, atol=param_tol, rtol=0, name="flushed parameter")


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_amp_host_pass_ahead_waits_for_the_upload_reading_its_staging_slot(prefetch):
    """Under AMP the host thread writes block b + slots into the staging slot block b's upload reads, as
    soon as that upload is issued: with delayed uploads, a host pass that does not wait for it overwrites
    the slot mid-copy and the wrong block reaches the compute. Same bytes as synchronous copies. Six
    blocks, so that even at prefetch 2 (4 staging slots) slots are reused within a step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()
    sync_losses, sync_params, sync_logits = run(copy.deepcopy(base), "bf16", prefetch, delays=None)
    losses, params, logits = run(copy.deepcopy(base), "bf16", prefetch, delays="slow_upload", host_thread=True)
    assert losses == sync_losses
    for p, q in zip(params, sync_params, strict=True):
        assert torch.equal(p, q)
    assert torch.equal(logits, sync_logits)


def test_async_ring_waits_on_real_events():
    """The executor's events block: a delayed upload is not visible before wait_uploaded returns."""
    from zo2.copy_executor import AsyncCopyExecutor
    from zo2.ring import Ring

    executor = AsyncCopyExecutor()
    ring = Ring(torch.device("cpu"), 1, 8, executor=executor)
    ring.buffers[0].zero_()
    ring.before_copy = lambda kind, slot: time.sleep(0.05)
    ring.upload(0, torch.full((8,), 7, dtype=torch.uint8))
    assert ring.buffers[0].sum() == 0  # still in flight after the call: the copy is asynchronous
    ring.wait_uploaded(0)
    assert torch.equal(ring.buffers[0], torch.full((8,), 7, dtype=torch.uint8))
    out = torch.zeros(8, dtype=torch.uint8)
    done = ring.release(0, out)
    done.wait()
    assert torch.equal(out, ring.buffers[0])
    executor.close()


GATE_SECONDS = 5.0  # how long a gated host pass waits for the step's first embedding forward before it gives up


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_amp_step_start_waits_only_for_the_first_blocks_host_pass(prefetch):
    """With the host pass on a host thread, the step start waits for no pass: the resident modules' forward
    (the embedding) runs while the passes of the first blocks are still pending, and block 0's upload waits
    for block 0's pass alone. Each pass queued at a step's start holds until that step's first embedding
    forward has begun (a step start that waits for a pass would hold it GATE_SECONDS and fail), then sleeps
    before writing its staging slot, so an upload that does not wait for its pass reads a stale slot: the
    bytes differ from the synchronous engine's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=5,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()
    sync_losses, sync_params, sync_logits = run(copy.deepcopy(base), "bf16", prefetch, delays=None)

    model = copy.deepcopy(base)
    opt = zo2.ZOSGD(model.parameters(), lr=2e-3, eps=1e-2, weight_decay=0.05, seed=11)
    engine = zo2.offload(model, opt, device="cpu", amp="bf16", prefetch=prefetch, verbose=False)
    engine.streamer.host_pool = ThreadPoolExecutor(1, thread_name_prefix="zo2-host")
    use_async_copies(engine)
    inject_copy_delays(engine, random_sleeps(prefetch, *DELAYS["even"]))
    embedded = threading.Event()  # set by the step's first embedding forward
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: embedded.set())
    held: list[tuple[int, bool]] = []  # (block, whether the embedding had begun) for each gated pass
    real_prepare = engine.streamer.prepare

    def gated_prepare(b, wire):
        if engine.in_step and len(held) < steps_started[0] * (prefetch + 1):  # a pass queued at the step start
            held.append((b, embedded.wait(GATE_SECONDS if all(ok for _, ok in held) else 0)))
        time.sleep(0.02)  # the staging slot is written late: only an upload that waits for the pass sees it
        real_prepare(b, wire)

    engine.streamer.prepare = gated_prepare
    steps_started = [0]
    losses = []
    for s in range(4):
        embedded.clear()
        steps_started[0] += 1
        batch = make_batch(s)
        losses.append(opt.step(lambda b=batch: model(**b).loss).item())
    opt.flush()
    with torch.no_grad():
        logits = model(**make_batch(0)).logits.float()
    params = [p.detach().clone() for p in model.parameters()]
    engine.detach()

    assert held == [(b, True) for _ in range(4) for b in range(prefetch + 1)], (
        "the step start waited for a host pass before the first forward began")
    assert losses == sync_losses  # every upload read its block's finished pass: the same bytes
    for p, q in zip(params, sync_params, strict=True):
        assert torch.equal(p, q)
    assert torch.equal(logits, sync_logits)
