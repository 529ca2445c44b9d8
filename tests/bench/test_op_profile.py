"""``--profile-ops``: flashdp's named regions under torch.profiler, and the per-op record of a ``dp`` run.

The expected call counts come from the model, not from flashdp: every module that owns a trainable parameter
is one clip group used once per backward pass (no tied weights here), so a step clips that many groups, each
either in a norm region and a clipped-sum region or in one fused ``clip_once`` region (the dispatcher's choice
for short sequences on CPU), and has one noise pass, one finite check and one division.
"""

import json

import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import flashdp
from flashdp import profiling
from memtrain.bench.cli import main
from memtrain.bench.op_profile import compare_profiles, merge_profiles


def _tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))


def _owners_of_trainable(model):
    return sum(any(p.requires_grad for p in m.parameters(recurse=False)) for m in model.modules())


def _region_calls(prof) -> dict[str, int]:
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("flashdp.")}


def _private_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("freeze_norms", [False, True])
def test_each_group_reports_its_clipping_once_per_step(freeze_norms):
    model = _tiny_llama()
    if freeze_norms:  # only Linear and Embedding groups left
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.requires_grad_(False)
    groups = _owners_of_trainable(model)
    flashdp.make_private(model, max_grad_norm=1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                              noise_multiplier=1.0, expected_batch_size=3, seed=0)
    ids = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(1))
    _private_step(model, opt, ids)  # warm: lazily built state does not count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            _private_step(model, opt, ids)
    calls = _region_calls(prof)
    once = calls.pop(profiling.CLIP_ONCE, 0)
    assert calls.pop(profiling.NORMS) == calls.pop(profiling.CLIPPED_SUM) == 2 * groups - once, calls
    assert calls == {profiling.NOISE: 2, profiling.FINITE_CHECK: 2, profiling.SCALE: 2}, calls


def test_tied_group_reports_one_norm_region_for_its_two_uses():
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=37, hidden_size=16, num_hidden_layers=1, ffn_dim=22, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16))
    groups = _owners_of_trainable(model) - 1  # the LM head's weight is the embedding's: one group for both
    flashdp.make_private(model, max_grad_norm=1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                              expected_batch_size=2)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _private_step(model, opt, ids)
    calls = _region_calls(prof)
    once = calls.get(profiling.CLIP_ONCE, 0)
    assert calls[profiling.NORMS] == calls[profiling.CLIPPED_SUM] == groups - once, calls
    assert profiling.NOISE not in calls  # σ = 0: no noise pass


def test_no_record_function_outside_a_profiler():
    with profiling.region(profiling.NORMS) as r:
        assert r is None  # contextlib.nullcontext yields None; record_function yields itself
    with profile(activities=[ProfilerActivity.CPU]):
        with profiling.region(profiling.NORMS) as r:
            assert r is not None


def test_merge_counts_an_absent_op_as_zero_and_compare_sorts_by_difference():
    rounds = [
        {"steps": 1, "step_ms": 100.0, "ops": {"aten::mm": {"ms": 50.0, "calls": 3, "region": False},
                                                "flashdp.norms": {"ms": 6.0, "calls": 4, "region": True}}},
        {"steps": 1, "step_ms": 110.0, "ops": {"aten::mm": {"ms": 60.0, "calls": 3, "region": False}}},
        {"steps": 1, "step_ms": 90.0, "ops": {"aten::mm": {"ms": 40.0, "calls": 3, "region": False},
                                               "flashdp.norms": {"ms": 8.0, "calls": 4, "region": True}}},
    ]
    dp = merge_profiles(rounds)
    assert dp["step_ms"]["median"] == 100.0 and dp["step_ms"]["rounds"] == 3
    assert dp["ops"]["flashdp.norms"]["ms"]["samples"] == [6.0, 0.0, 8.0]
    assert dp["ops"]["flashdp.norms"]["ms"]["median"] == 6.0
    base = merge_profiles([{"steps": 1, "step_ms": 80.0, "ops": {
        "aten::mm": {"ms": 49.0, "calls": 3, "region": False},
        "aten::add": {"ms": 5.0, "calls": 1, "region": False}}}])
    comp = compare_profiles(dp, base)
    assert comp["regions"] == {"flashdp.norms": {"ms": 6.0, "share_of_baseline_step": 6.0 / 80.0, "calls": 4}}
    assert [(d["op"], d["difference_ms"]) for d in comp["largest_differences"]] == [("aten::add", -5.0),
                                                                                    ("aten::mm", 1.0)]


@pytest.fixture(scope="module")
def profiled_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    main(["dp", "--model", "llama-tiny", "--methods", "nondp,flashdp", "--batch", "2", "--seq", "16", "--steps", "1",
          "--warmup", "1", "--rounds", "2", "--profile-ops", "1", "--no-plots", "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def test_dp_run_records_regions_against_the_non_dp_step(profiled_record):
    results = {r["method"]: r for r in profiled_record["results"]}
    for r in results.values():
        assert r["status"] == "ok", r.get("traceback")
        assert r["op_profile"]["step_ms"]["rounds"] == 2
    assert not any(op["region"] for op in results["nondp"]["op_profile"]["ops"].values())
    from memtrain.bench.presets import build_model

    groups = _owners_of_trainable(build_model("llama-tiny", torch.float32, "cpu"))
    comp = profiled_record["comparisons"][0]["op_profile"]
    regions = comp["regions"]
    once = regions.get("flashdp.clip_once", {"calls": 0})["calls"]
    assert regions["flashdp.norms"]["calls"] == regions["flashdp.clipped_sum"]["calls"] == groups - once
    assert regions["flashdp.noise"]["calls"] == 1
    for name in ("flashdp.norms", "flashdp.clipped_sum", "flashdp.noise"):
        assert 0 < regions[name]["share_of_baseline_step"] < 1, (name, regions[name])
    diffs = [abs(d["difference_ms"]) for d in comp["largest_differences"]]
    assert diffs == sorted(diffs, reverse=True) and diffs


def test_profile_ops_rejects_a_negative_count():
    with pytest.raises(SystemExit):
        main(["dp", "--model", "llama-tiny", "--profile-ops", "-1"])


def test_profiling_runs_after_every_measured_round(monkeypatch):
    """A profiler session changes the heap (and so the RSS) of what runs after it: no round may be measured
    after one. Order of events over 2 rounds of 2 methods: 4 measurement windows, then 4 profiles."""
    from memtrain.bench import run as bench_run
    from memtrain.bench.catalogue import METHODS

    events = []
    start = bench_run.MemoryProbe.start
    monkeypatch.setattr(bench_run.MemoryProbe, "start", lambda self: (events.append("measure"), start(self))[1])
    monkeypatch.setattr(bench_run, "profile_steps",
                        lambda step, n, device: (events.append("profile"), {"steps": n, "step_ms": 1.0, "ops": {}})[1])
    cfg = bench_run.RunConfig(model="llama-tiny", batch=1, seq=8, dtype=torch.float32, device="cpu", steps=1,
                              warmup=0, rounds=2, profile_ops=1)
    records = bench_run.run_comparison({m: METHODS[m] for m in ("forward", "zo2")}, cfg)
    assert all(r["status"] == "ok" and r["op_profile"]["step_ms"]["rounds"] == 2 for r in records), records
    assert events == ["measure"] * 4 + ["profile"] * 4, events
