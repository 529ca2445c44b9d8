"""The memory planner against measured CPU peaks (RSS increase over a pre-build baseline), tiny presets."""

import json
import subprocess
import sys

import pytest
import torch

from memtrain.bench.catalogue import plan_method
from memtrain.bench.memory import MemoryProbe
from memtrain.bench.planner import model_shape
from memtrain.bench.presets import PRESETS

TINY = [name for name, p in PRESETS.items() if p.tiny]
# Methods whose plan is known to be off by more than 25% on a preset, by preset: none. (The AMP offload plan was
# 25-28% above the measured peak: it counted every half's logits at once, in fp32; the halves compute their loss one
# after the other, in the compute dtype. Traced by tests/zo2/test_plan.py's measured step.)
KNOWN_GAPS: dict[str, tuple[str, ...]] = {}


# The comparison runs in a fresh interpreter, as `memtrain-bench` does for a user: the RSS of a step depends on
# the process's heap history (after a torch.profiler session with backward passes, a no-grad forward of
# llama-tiny leaves 6-8 MiB of freed small chunks in glibc's heap that only malloc_trim returns), so the same
# comparison measured after other tests in this process reads 15-35% higher for the no-grad methods.
_COMPARISON = """
import json, sys, torch
from memtrain.bench.catalogue import METHODS
from memtrain.bench.run import RunConfig, run_comparison
cfg = RunConfig(model=sys.argv[1], batch=4, seq=128, dtype=torch.float32, device="cpu", steps=1, warmup=1,
                trainable="linear")
print(json.dumps([{k: r.get(k) for k in ("method", "status", "memory_bytes", "error")}
                  for r in run_comparison(METHODS, cfg)]))
"""


def _comparison_in_a_fresh_process(preset: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-P", "-c", _COMPARISON, preset], capture_output=True, text=True,
                         check=False, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", TINY)
def test_plan_within_25_percent_of_measured_peak(preset):
    if MemoryProbe("cpu").note:
        pytest.skip("the RSS peak cannot be reset on this platform")
    shape = model_shape(preset, "linear")
    errors, measured = {}, 0
    for r in _comparison_in_a_fresh_process(preset):
        if r["status"] != "ok":
            continue  # e.g. Opacus on OPT; reported by the CLI, covered in test_cli.py
        measured += 1
        peak = r["memory_bytes"]["peak"]
        assert peak > 30 * 2**20, f"{r['method']}: a {peak / 2**20:.0f} MiB peak is too small to check a plan on"
        errors[r["method"]] = plan_method(r["method"], shape, 4, 128, device="cpu").total / peak - 1
    assert measured >= 5
    bad = {m: f"{100 * e:+.0f}%" for m, e in errors.items() if abs(e) > 0.25}
    known = {m: bad.pop(m) for m in KNOWN_GAPS.get(preset, ()) if m in bad}
    assert not bad, f"plan off by more than 25%: {bad} (all: { {m: round(e, 3) for m, e in errors.items()} })"
    if known:
        pytest.xfail(f"known gap, not yet traced to a term: {known}")


def test_plan_parts_scale_as_expected():
    s = model_shape("opt-tiny")
    small, big = plan_method("sgd", s, 2, 64), plan_method("sgd", s, 4, 128)
    assert big.components["activations"] == 4 * small.components["activations"]
    assert big.components["weights"] == small.components["weights"] == (s.params + s.buffers) * 4
    adamw = plan_method("adamw", s, 2, 64)
    assert adamw.components["optimizer state"] == 2 * s.trainable * 4
    with pytest.raises(ValueError, match="no memory plan"):
        plan_method("lion", s, 2, 64)


# ---------------------------------------------------------------------------------- FSDP2, two gloo ranks
# Slack of a measured RSS against a plan. After set-up: one 4 KiB page of rounding per parameter tensor (< 100
# tensors: < 0.4 MiB) plus the modules' Python objects and FSDP2's bookkeeping: 1 MiB. At the step's peak: that
# page rounding for the few hundred tensors then alive (~1-2 MiB), glibc's per-thread heaps for allocations under
# the 64 KiB mmap threshold (autograd and FSDP2 bookkeeping) and gloo's staging buffers: 8 MiB. The plan sums
# terms that peak at different moments, so it may exceed the measurement by its transient terms (the gathered
# unit and its reduce-scatter, the per-sample workspace; zo2's gathered blocks and block temporaries, freed
# before the logits appear), and not fall short of it by more than the slack.
SETUP_SLACK = 1 << 20
PEAK_SLACK = 8 << 20


def test_fsdp_plans_against_measured_peaks_on_two_gloo_ranks():
    from memtrain.bench.plan_measure import measure_fsdp_peaks
    from memtrain.bench.plan_scale import TRANSIENT, flashdp_fsdp, zo2_fsdp
    from memtrain.bench.planner import PlanInput
    from memtrain.memory import peak_rss_resettable

    if not peak_rss_resettable():
        pytest.skip("the RSS peak cannot be reset on this platform")
    batch, seq, world = 8, 256, 2
    cases = [(preset, method) for preset in TINY for method in ("flashdp", "zo2")]
    ranks = measure_fsdp_peaks(cases, world=world, batch=batch, seq=seq, steps=2)
    report = {}
    for preset, method in cases:
        shape = model_shape(preset)
        i = PlanInput(shape, batch, seq, torch.float32, "cpu")
        plan = (flashdp_fsdp if method == "flashdp" else zo2_fsdp)(i, world)
        transient = sum(v for k, v in plan.components.items() if k.startswith(TRANSIENT[method]))
        shards = -(-shape.params // world) * 4  # each rank's fp32 shard of every parameter, tied ones once
        for rank, rec in enumerate(ranks):
            m = rec[f"{preset} {method}"]
            label = f"{preset} {method} rank {rank}"
            report[label] = (plan.total / 2**20, m["peak_bytes"] / 2**20)
            assert abs(m["after_setup_bytes"] - shards) <= SETUP_SLACK, (label, m, shards)
            assert m["peak_bytes"] > 64 << 20, f"{label}: too small a peak to check a plan on"
            assert m["peak_bytes"] - PEAK_SLACK <= plan.total <= m["peak_bytes"] + transient + PEAK_SLACK, (
                f"{label}: plan {plan.total / 2**20:.1f} MiB, measured {m['peak_bytes'] / 2**20:.1f} MiB, "
                f"transient terms {transient / 2**20:.1f} MiB; all (plan, measured) MiB: {report}")


def test_zo2_fsdp_shard_term_is_what_a_rank_holds_after_set_up():
    from memtrain.bench.plan_scale import zo2_fsdp
    from memtrain.bench.planner import PlanInput

    s = model_shape("opt-13b")
    plan = zo2_fsdp(PlanInput(s, 8, 2048, torch.bfloat16), 8)
    assert plan.components["shards  ⌈P/W⌉·b"] == -(-s.params // 8) * 2
    assert plan.components["root gathered  R·c"] == (s.params - s.in_blocks) * 2


def test_plan_cli_prints_each_term_per_device(tmp_path, capsys):
    import json

    from memtrain.bench.cli import main

    main(["plan", "--world-size", "8", "--shard", "fsdp", "--model", "llama2-13b", "--batch", "8", "--seq", "2048",
          "--dtype", "bfloat16", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "results.json").read_text())
    methods = [p["method"] for p in rec["plans"]]
    assert methods == ["flashdp FSDP2", "zo2 FSDP2", "zo2 offload (per rank)", "zo2 offload + AMP (per rank)"]
    out = capsys.readouterr().out
    for p in rec["plans"]:
        assert p["world_size"] == 8 and p["total_bytes"] == sum(p["components_bytes"].values())
        for term in p["components_bytes"]:
            assert term in out
    with pytest.raises(SystemExit):
        main(["plan", "--world-size", "2"])  # several ranks need --shard ddp or fsdp
