"""The benchmark CLI end to end on tiny presets (CPU): every method, the JSON fields, failures, plans."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from memtrain.bench.cli import main
from memtrain.bench.dp_methods import DP_METHODS
from memtrain.bench.methods import Method, MethodUnavailable
from memtrain.bench.run import RunConfig, run_comparison
from memtrain.bench.zo_methods import ZO_METHODS

OFFLOAD = {"zo2-offload", "zo2-offload-amp"}
SMALL = ["--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1"]


def _run(tmp_path, *argv):
    main([*argv, *SMALL, "--out", str(tmp_path)])
    return json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def zo_record(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("zo"), "zo", "--model", "opt-tiny", "--methods", ",".join(ZO_METHODS),
                "--profile-memory")


@pytest.fixture(scope="module")
def dp_record(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dp"), "dp", "--model", "llama-tiny", "--trainable", "linear")


def _by_method(record):
    return {r["method"]: r for r in record["results"]}


def test_zo_runs_every_method(zo_record):
    results = _by_method(zo_record)
    assert set(results) == set(ZO_METHODS)
    for name, r in results.items():
        assert r["status"] == "ok", f"{name}: {r.get('traceback') or r.get('error')}"
        assert r["tokens_per_s"] > 0 and r["memory_bytes"]["peak"] > 0
        assert all(torch.isfinite(torch.tensor(r["losses"])))


def test_dp_runs_every_method(dp_record):
    results = _by_method(dp_record)
    assert set(results) == set(DP_METHODS)
    for r in results.values():
        assert r["status"] == "ok", r.get("traceback") or r.get("error")


def test_json_has_the_documented_fields(zo_record):
    for key in ("schema", "command", "argv", "config", "environment", "results", "plots", "rss_timeline"):
        assert key in zo_record, key
    for key in ("device_name", "driver", "torch", "triton", "git_sha", "timestamp", "bench_device"):
        assert key in zo_record["environment"], key
    for key in ("model", "batch", "seq", "dtype", "device", "steps", "warmup", "methods"):
        assert key in zo_record["config"], key
    ok = next(r for r in zo_record["results"] if r["method"] == "zo2")
    for key in ("model", "n_params", "status", "tokens_per_s", "median_step_s", "step_times_s", "memory_kind",
                "memory_bytes", "plan", "plan_error", "breakdown", "rss_peak_bytes"):
        assert key in ok, key
    assert set(ok["memory_bytes"]) >= {"build_peak", "after_build", "first_step_peak", "steady_step_peak", "peak"}
    assert {"phases_peak_bytes", "owners_bytes", "planned_owners_bytes"} <= set(ok["breakdown"])
    assert ok["tokens_per_s"] == pytest.approx(2 * 32 / ok["median_step_s"])
    phases = {s["phase"] for s in zo_record["rss_timeline"]}
    assert "zo2:step" in phases or "zo2:first step" in phases


def test_plots_are_written(zo_record):
    pytest.importorskip("matplotlib")
    names = {p.rsplit("/", 1)[-1] for p in zo_record["plots"]}
    assert {"peak_memory.png", "throughput.png", "rss_timeline.png"} <= names


def test_opacus_failing_on_opt_is_reported_and_the_others_run(tmp_path):
    record = _run(tmp_path, "dp", "--model", "opt-tiny", "--methods", "opacus,nondp,flashdp")
    results = _by_method(record)
    assert results["opacus"]["status"] in ("failed", "unavailable") and results["opacus"]["error"]
    assert results["nondp"]["status"] == results["flashdp"]["status"] == "ok"


def test_a_raising_method_does_not_stop_the_others():
    def broken(workload):
        raise RuntimeError("broken on purpose")

    def refused(workload):
        raise MethodUnavailable("not here")

    methods = {"broken": Method(broken, "broken"), "refused": Method(refused, "refused"), "zo2": ZO_METHODS["zo2"]}
    cfg = RunConfig(model="opt-tiny", batch=2, seq=16, dtype=torch.float32, device="cpu", steps=1, warmup=0,
                    prime=False)
    results = {r["method"]: r for r in run_comparison(methods, cfg)}
    assert results["broken"]["status"] == "failed" and "broken on purpose" in results["broken"]["error"]
    assert results["refused"]["status"] == "unavailable"
    assert results["zo2"]["status"] == "ok"


def test_offload_methods_record_the_engine_plan(zo_record):
    for name in OFFLOAD:
        plan = _by_method(zo_record)[name]["offload_plan"]
        assert plan["ring_bytes"] > 0 and plan["num_blocks"] == 2 and plan["text"]


def test_plan_needs_no_memory_for_huge_models(tmp_path):
    main(["plan", "--model", "opt-175b,llama2-70b", "--methods", "adamw,zo2,zo2-offload-amp", "--batch", "1",
          "--seq", "2048", "--dtype", "bfloat16", "--out", str(tmp_path)])
    plans = {(p["model"], p["method"]): p for p in json.loads((tmp_path / "results.json").read_text())["plans"]}
    adamw, zo, off = (plans[("opt-175b", m)]["total_bytes"] for m in ("adamw", "zo2", "zo2-offload-amp"))
    assert off < zo < adamw
    assert zo >= 2 * 174.6e9  # bf16 weights of 174.6 B parameters


def test_unknown_method_is_an_error_that_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["zo", "--methods", "adam"])
    assert "adamw" in capsys.readouterr().err


def test_console_script(tmp_path):
    script = shutil.which("memtrain-bench") or str(pathlib.Path(sys.executable).with_name("memtrain-bench"))
    done = subprocess.run([script, "plan", "--model", "opt-tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "planned peak memory" in done.stdout
