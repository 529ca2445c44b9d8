"""gpu-check sections on zo2's offloading: equality with plain ZOSGD, step ratios, peaks against the plan.

Models are built from preset configs on the meta device, then materialised on the host and filled with
the Philox noise kernel (0.02·z for matrices, ones/zeros for norms): random weights at memory speed, so an
OPT-13B appears in seconds rather than the minutes of module-by-module initialisation. Nothing is
downloaded. Each ``section_*`` runs in its own interpreter (bench/gpu_check.py). Without CUDA the sections
return the plans (``zo2.plan_offload`` on the meta-device model) and say why nothing was measured.
"""

from __future__ import annotations

import copy

import torch

import zo2
from zo2.copy_executor import inject_copy_delays, random_cuda_spins

from ._harness import interleaved
from .offload_ratio import hidden_share
from .presets import meta_model

SYNTHETIC = "opt-2048x8"  # hidden 2048, 8 layers (bench/presets.py)
DELAY_CYCLES = 2_000_000  # about 1 ms at ~2 GHz before each copy: longer than a small block's transfer
LR, EPS, SEED = 2e-3, 1e-2, 6
# plain vs offloaded, as tests/zo2/test_offload_gpu.py holds them: fp32 losses to 2e-5, parameters to 1e-4 (the
# two runs may order a reduction differently); AMP computes in bf16 (8-bit mantissa: 2^-8 ≈ 4e-3 relative per
# rounding), so the loss to 2e-2 relative and the fp32 masters to 5e-3 after three steps.
TOL = {None: {"loss_abs": 2e-5, "param_abs": 1e-4}, "bf16": {"loss_rel": 2e-2, "param_abs": 5e-3}}


def host_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """``name``'s model on the host with random weights drawn by the Philox kernel (see the module docstring)."""
    from memtrain.kernels.philox import philox_fill_

    model = meta_model(name).to_empty(device="cpu").to(dtype)
    if any(True for _ in model.buffers()):
        raise ValueError(f"{name}: buffers cannot be filled after to_empty; build it with presets.build_model")
    with torch.no_grad():
        for i, (pname, p) in enumerate(model.named_parameters()):
            if "norm" in pname:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
            else:
                philox_fill_(p, seed, stream=i).mul_(0.02)
    return model.eval()


def plan_json(plan: zo2.OffloadPlan, batch: int, seq: int) -> dict:
    return {"device_bytes": plan.device_bytes, "ring_bytes": plan.ring_bytes, "resident_bytes": plan.resident_bytes,
            "host_bytes": plan.host_bytes, "activation_bytes": plan.activation_bytes(batch, seq),
            "block_bytes": plan.block_bytes, "ring_slots": plan.ring_slots, "amp": plan.amp}


def _inject_copy_delays(engine: zo2.OffloadEngine, cycles: int) -> None:
    """Make every copy of ``engine`` start up to ``cycles`` GPU cycles late (seeded ``torch.cuda._sleep`` on
    its copy streams, after what each copy waits for, through the ring's ``before_copy`` hook): a missing wait
    then reads a slot before its data arrives."""
    inject_copy_delays(engine, random_cuda_spins(seed=SEED, max_cycles=cycles))


def planned_pinned_bytes(plan: zo2.OffloadPlan) -> int:
    """The page-locked bytes the plan counts (exactly what the stores register)."""
    return plan.pinned_host_bytes


def _pinned_now() -> int:
    """Bytes torch's pinned-memory allocator holds now; 0 before torch 2.7 (no ``host_memory_stats``: the
    pinned goal then counts the stores' own buffers, :func:`_pinned_buffers`, alone)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return 0
    now = stats()
    return int(now.get("allocated_bytes.all.current", now.get("allocated_bytes.current", 0)))


def _pinned_buffers(engine: zo2.OffloadEngine) -> int:
    """Bytes of the page-locked host buffers the engine's stores and staging slots hold (each storage once)."""
    seen, total = set(), 0
    for _, flat in engine.streamer.host_buffers():
        st = flat.untyped_storage()
        if flat.is_pinned() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _batches(vocab: int, batch: int, seq: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g).cuda() for _ in range(n)]


def _step(opt: zo2.ZOSGD, model: torch.nn.Module, ids: torch.Tensor) -> float:
    return opt.step(lambda: model(input_ids=ids, labels=ids).loss).item()


def _compare(host: torch.nn.Module, plain: torch.nn.Module) -> float:
    """Largest absolute difference between the offloaded model's flushed parameters and the plain ones."""
    worst = 0.0
    for p, q in zip(host.parameters(), plain.parameters(), strict=True):
        worst = max(worst, float((p.detach().to("cuda", torch.float32) - q.detach().float()).abs().max()))
    return worst


def _offloaded_run(base: torch.nn.Module, batches: list[torch.Tensor], prefetch: int, amp: str | None,
                   delay: int) -> tuple[list[float], torch.nn.Module, zo2.OffloadEngine, dict]:
    host = copy.deepcopy(base)
    pinned0 = _pinned_now()
    before = torch.cuda.memory_allocated()
    opt = zo2.ZOSGD(host.parameters(), lr=LR, eps=EPS, seed=SEED)
    engine = zo2.offload(host, opt, device="cuda", amp=amp, prefetch=prefetch, verbose=False)
    if delay:
        _inject_copy_delays(engine, delay)
    losses = []
    for i, ids in enumerate(batches):
        if i == len(batches) - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses.append(_step(opt, host, ids))
    torch.cuda.synchronize()
    mem = {"peak_allocated_bytes": torch.cuda.max_memory_allocated() - before,
           "pinned_allocator_bytes": _pinned_now() - pinned0, "pinned_buffer_bytes": _pinned_buffers(engine)}
    opt.flush()
    return losses, host, engine, mem


def section_zo2_offload() -> dict:
    """Synthetic OPT (hidden 2048, 8 layers), B=4, T=512: offloaded vs plain ZOSGD at prefetch 0/1/2 and AMP,
    with and without copy delays; step ratio, transfer hidden, peak and pinned bytes against the plan."""
    batch, seq, steps = 4, 512, 3
    meta = meta_model(SYNTHETIC)
    configs = [(0, None), (1, None), (2, None), (1, "bf16")]
    plans = {f"prefetch={p} amp={a}": plan_json(zo2.plan_offload(meta, amp=a, prefetch=p), batch, seq)
             for p, a in configs}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device (plans only)", "model": SYNTHETIC, "plans": plans,
                "figures": [{"name": f"{k}: planned device bytes (resident + ring + activations)",
                             "value": v["device_bytes"] + v["activation_bytes"]} for k, v in plans.items()]}
    base = host_model(SYNTHETIC)
    batches = _batches(meta.config.vocab_size, batch, seq, steps)
    plain = copy.deepcopy(base).cuda()
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=LR, eps=EPS, seed=SEED)
    plain_losses = [_step(opt_plain, plain, ids) for ids in batches]
    out: dict = {"model": SYNTHETIC, "batch": batch, "seq": seq, "steps": steps, "plans": plans,
                 "plain_losses": plain_losses, "runs": {}, "checks": [], "goals": [], "figures": []}
    for prefetch, amp in configs:
        tol = TOL[amp]
        undelayed = None
        for delay in (0, DELAY_CYCLES):
            label = f"prefetch={prefetch} amp={amp} delay={delay}"
            losses, host, engine, mem = _offloaded_run(base, batches, prefetch, amp, delay)
            dparam = _compare(host, plain)
            dloss = max(abs(a - b) for a, b in zip(losses, plain_losses, strict=True))
            loss_bound = tol.get("loss_abs") or tol["loss_rel"] * max(abs(v) for v in plain_losses)
            plan = engine.plan
            planned = plan.device_bytes + plan.activation_bytes(batch, seq)
            out["runs"][label] = {"losses": losses, "max_loss_diff": dloss, "max_param_diff": dparam, **mem,
                                  "planned_device_bytes": planned, "planned_host_bytes": plan.host_bytes}
            out["checks"].append({"name": f"{label}: losses equal plain", "ok": dloss <= loss_bound,
                                  "value": dloss, "bound": loss_bound})
            out["checks"].append({"name": f"{label}: flushed parameters equal plain", "ok": dparam <= tol["param_abs"],
                                  "value": dparam, "bound": tol["param_abs"]})
            if undelayed is None:
                undelayed = (losses, [p.detach().clone() for p in host.parameters()])
                out["goals"].append({"name": f"{label}: peak allocated <= plan", "met": mem["peak_allocated_bytes"]
                                     <= planned, "value": mem["peak_allocated_bytes"], "goal": planned})
                pinned = max(mem["pinned_allocator_bytes"], mem["pinned_buffer_bytes"])
                planned_pinned = planned_pinned_bytes(plan)
                out["goals"].append({"name": f"{label}: pinned bytes == plan", "met": pinned == planned_pinned,
                                     "value": pinned, "goal": planned_pinned})
            else:  # the copies only moved in time: every bit must be the same
                same = losses == undelayed[0] and all(torch.equal(p, q) for p, q in
                                                      zip(host.parameters(), undelayed[1], strict=True))
                out["checks"].append({"name": f"{label}: bit-identical to the undelayed run", "ok": same,
                                      "value": same, "bound": True})
            engine.detach()
            del host, engine
            torch.cuda.empty_cache()
    out["timing"] = {}
    for amp in (None, "bf16"):  # after the equality runs: timing steps move the plain model on
        host = copy.deepcopy(base)
        opt_off = zo2.ZOSGD(host.parameters(), lr=LR, eps=EPS, seed=SEED)
        engine = zo2.offload(host, opt_off, device="cuda", amp=amp, prefetch=1, verbose=False)
        t = out["timing"][f"prefetch=1 amp={amp}"] = _ratio(opt_plain, plain, opt_off, host, engine, batches[0])
        out["figures"] += [{"name": f"prefetch=1 amp={amp}: step offloaded / plain", "value": t["ratio"]},
                           {"name": f"prefetch=1 amp={amp}: share of transfer time hidden", "value": t["hidden_share"]}]
        engine.detach()
        del host, engine
    return out


def _ratio(opt_plain: zo2.ZOSGD, plain: torch.nn.Module, opt_off: zo2.ZOSGD, host: torch.nn.Module,
           engine: zo2.OffloadEngine, ids: torch.Tensor) -> dict:
    """Offloaded / plain step (interleaved rounds, the harness's loop) and the share of transfer time hidden."""
    stats = interleaved({"plain": lambda: _step(opt_plain, plain, ids), "offload": lambda: _step(opt_off, host, ids)},
                        rounds=5, warmup=1, device="cuda")
    transfers = engine.time_transfers(rounds=3)
    off, pl = stats["offload"]["median"], stats["plain"]["median"]
    return {"plain_median_s": pl, "offload_median_s": off, "ratio": off / pl, "transfers_s": transfers,
            "hidden_share": hidden_share(off, pl, transfers)}


def section_opt_1_3b() -> dict:
    """OPT-1.3B, fp32, B=4, T=512, prefetch 1: offloaded / plain step."""
    batch, seq = 4, 512
    plan = zo2.plan_offload(meta_model("opt-1.3b"), prefetch=1)
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device (plan only)", "plan": plan_json(plan, batch, seq)}
    base = host_model("opt-1.3b")
    ids = _batches(base.config.vocab_size, batch, seq, 1)[0]
    plain = copy.deepcopy(base).cuda()
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=LR, eps=EPS, seed=SEED)
    opt_off = zo2.ZOSGD(base.parameters(), lr=LR, eps=EPS, seed=SEED)
    engine = zo2.offload(base, opt_off, device="cuda", prefetch=1, verbose=False)
    t = _ratio(opt_plain, plain, opt_off, base, engine, ids)
    return {"model": "opt-1.3b", "batch": batch, "seq": seq, "plan": plan_json(plan, batch, seq), **t,
            "figures": [{"name": "step offloaded / plain", "value": t["ratio"]},
                        {"name": "share of transfer time hidden", "value": t["hidden_share"]}]}


GOAL_13B = 5 * 10**9  # bytes; ZO2 published 6.18 GB for this step


def section_opt_13b() -> dict:
    """Peak allocated device memory of an offloaded OPT-13B step, B=1, T=2048, bf16 AMP, when the host holds it."""
    import psutil

    batch, seq = 1, 2048
    meta = meta_model("opt-13b")
    plan = zo2.plan_offload(meta, amp="bf16", prefetch=1)
    fp32 = sum(p.numel() for p in meta.parameters()) * 4
    # the fp32 model is built first; the store moves each block into its fp32 master (freeing the original)
    # and the staging slots hold the bf16 blocks in flight: the fp32 model + the plan's host bytes beyond
    # the masters, with 10% for the allocator
    host_need = int(1.1 * (fp32 + plan.staging_slots * plan.block_bytes))
    avail = psutil.virtual_memory().available
    out = {"model": "opt-13b", "batch": batch, "seq": seq, "plan": plan_json(plan, batch, seq),
           "host_need_bytes": host_need, "host_available_bytes": avail, "goal_bytes": GOAL_13B,
           "zo2_published_bytes": 6.18e9,
           "figures": [{"name": "planned device bytes (resident + ring + activations)",
                        "value": plan.device_bytes + plan.activation_bytes(batch, seq)},
                       {"name": "host bytes needed / available", "value": f"{host_need} / {avail}"}]}
    if not torch.cuda.is_available():
        return {**out, "status": "skipped", "reason": "no CUDA device (plan only)"}
    if avail < host_need:
        return {**out, "status": "skipped", "reason": f"host memory: needs {host_need / 2**30:.0f} GiB, "
                f"{avail / 2**30:.0f} GiB available"}
    need = plan.device_bytes + plan.activation_bytes(batch, seq)
    free, _ = torch.cuda.mem_get_info()
    if need > free:
        return {**out, "status": "skipped", "reason": f"device memory: the plan needs {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free"}
    model = host_model("opt-13b")
    opt = zo2.ZOSGD(model.parameters(), lr=LR, eps=EPS, seed=SEED)
    engine = zo2.offload(model, opt, device="cuda", amp="bf16", prefetch=1, verbose=False)
    ids = _batches(meta.config.vocab_size, batch, seq, 1)[0]
    _step(opt, model, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = _step(opt, model, ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    planned = engine.plan.device_bytes + engine.plan.activation_bytes(batch, seq)
    return {**out, "loss": loss, "peak_allocated_bytes": peak, "planned_device_bytes": planned,
            "pinned_buffer_bytes": _pinned_buffers(engine),
            "goals": [{"name": "OPT-13B offloaded step peak allocated", "met": peak <= GOAL_13B, "value": peak,
                       "goal": GOAL_13B},
                      {"name": "OPT-13B peak allocated <= plan", "met": peak <= planned, "value": peak,
                       "goal": planned}]}
