"""The benchmark CLI end to end on tiny presets (CPU): every method, the JSON record, failures, plans, kernels."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from memtrain.bench.catalogue import METHODS
from memtrain.bench.cli import kernel_scripts, main
from memtrain.bench.dp_methods import DP_METHODS
from memtrain.bench.methods import Method, MethodUnavailable, Runner
from memtrain.bench.planner import backward_parts
from memtrain.bench.run import RunConfig, run_comparison
from memtrain.bench.zo_methods import ZO_METHODS

REPO = pathlib.Path(__file__).resolve().parents[2]
OFFLOAD = {"zo2-offload", "zo2-offload-amp", "dpzo-offload"}
SMALL = ["--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--no-plots"]


def _run(tmp_path, *argv):
    main([*argv, *SMALL, "--out", str(tmp_path)])
    return json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def zo_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo")
    main(["zo", "--model", "opt-tiny", "--methods", ",".join(ZO_METHODS), "--profile-memory", "--rounds", "1",
          *SMALL[:-1], "--out", str(out)])  # with plots
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def dp_record(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dp"), "dp", "--model", "llama-tiny", "--trainable", "linear",
                "--rounds", "1")


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
        assert r["rounds"] == len(r["samples"]) == len(r["step_times"]) == 1


def test_record_carries_its_provenance(dp_record):
    """The keys a reader (and the RESULTS.md provenance check) relies on, with the types it expects."""
    assert dp_record["command"].startswith("memtrain-bench dp --model llama-tiny")
    assert dp_record["argv"][0] == "dp" and dp_record["subcommand"] == "dp"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", dp_record["date"])
    env = dp_record["env"]
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])
    assert env["dirty"] is None or isinstance(env["dirty"], bool)
    assert (env["commit"] is None) == (env["dirty"] is None)
    assert env["cpu_model"] and env["cpu_count"] >= 1
    for key in ("torch", "triton", "transformers", "memtrain", "device_name", "driver", "python", "report"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"


def test_each_result_has_its_samples_and_quantiles(dp_record):
    for r in dp_record["results"]:
        assert len(r["samples"]) == r["rounds"]
        # each round's sample is the mean of its timed steps (one here)
        assert r["samples"] == [sum(ts) / len(ts) for ts in r["step_times"]]
        assert min(r["samples"]) <= r["p20"] <= r["median"] <= r["p80"] <= max(r["samples"])
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["median"])


def test_json_has_the_documented_fields(zo_record):
    for key in ("schema", "command", "argv", "date", "env", "config", "results", "comparisons", "plots",
                "rss_timeline"):
        assert key in zo_record, key
    for key in ("model", "batch", "seq", "dtype", "device", "steps", "warmup", "rounds", "methods", "prefetch"):
        assert key in zo_record["config"], key
    ok = next(r for r in zo_record["results"] if r["method"] == "zo2")
    for key in ("model", "n_params", "status", "tokens_per_s", "median", "p20", "p80", "rounds", "samples",
                "step_times", "memory_kind", "memory_bytes", "plan", "plan_error", "breakdown", "rss_peak_bytes"):
        assert key in ok, key
    assert set(ok["memory_bytes"]) >= {"build_peak", "after_build", "first_step_peak", "steady_step_peak", "peak"}
    assert {"phases_peak_bytes", "owners_bytes", "planned_owners_bytes"} <= set(ok["breakdown"])
    phases = {s["phase"] for s in zo_record["rss_timeline"]}
    assert "zo2:step" in phases or "zo2:first step" in phases


def test_plots_are_written(zo_record):
    pytest.importorskip("matplotlib")
    names = {p.rsplit("/", 1)[-1] for p in zo_record["plots"]}
    # one model size: the plan's terms beside the measured peak, not peak against size (tests/bench/test_report.py)
    assert {"memory_by_term.png", "throughput.png", "rss_timeline.png"} <= names
    assert "peak_memory.png" not in names


def test_opacus_failing_on_opt_is_reported_and_the_others_run(tmp_path):
    record = _run(tmp_path, "dp", "--model", "opt-tiny", "--methods", "opacus,nondp,flashdp", "--rounds", "1")
    results = _by_method(record)
    assert results["opacus"]["status"] in ("failed", "unavailable") and results["opacus"]["error"]
    assert results["nondp"]["status"] == results["flashdp"]["status"] == "ok"


def test_a_raising_method_does_not_stop_the_others():
    def broken(workload):
        raise RuntimeError("broken on purpose")

    def refused(workload):
        raise MethodUnavailable("not here")

    methods = {"broken": Method("broken", "broken", broken, backward_parts),
               "refused": Method("refused", "refused", refused, backward_parts), "zo2": ZO_METHODS["zo2"]}
    cfg = RunConfig(model="opt-tiny", batch=2, seq=16, dtype=torch.float32, device="cpu", steps=1, warmup=0,
                    prime=False)
    results = {r["method"]: r for r in run_comparison(methods, cfg)}
    assert results["broken"]["status"] == "failed" and "broken on purpose" in results["broken"]["error"]
    assert results["refused"]["status"] == "unavailable"
    assert results["zo2"]["status"] == "ok"


def test_rounds_interleave_and_a_failed_round_is_counted():
    """Rounds run A B, B A; a method failing in one round keeps the others' samples and says so."""
    order = []

    def counting(name, fail_in_round=None):
        def setup(workload):
            order.append(name)
            if order.count(name) == fail_in_round:
                raise RuntimeError(f"{name} fails in round {fail_in_round}")
            return Runner(lambda: 1.0)

        return Method(name, name, setup, backward_parts)

    methods = {"a": counting("a"), "b": counting("b", fail_in_round=2)}
    cfg = RunConfig(model="opt-tiny", batch=2, seq=8, dtype=torch.float32, device="cpu", steps=2, warmup=1,
                    rounds=2, prime=False)
    results = {r["method"]: r for r in run_comparison(methods, cfg)}
    assert "".join(order) == "abba"
    a, b = results["a"], results["b"]
    assert a["rounds"] == len(a["samples"]) == 2 and [len(ts) for ts in a["step_times"]] == [2, 2]
    assert a["losses"] == [1.0] * 6 and "failed_rounds" not in a
    assert b["status"] == "ok" and b["rounds"] == 1
    assert b["failed_rounds"] == 1 and "fails in round 2" in b["failed_round_error"]


def test_a_raising_extra_timing_is_reported_and_the_step_times_stand():
    def raising():
        raise RuntimeError("ring busy")

    method = Method("x", "x", lambda w: Runner(lambda: 1.0, extra_timings={"transfers": raising}), backward_parts)
    cfg = RunConfig(model="opt-tiny", batch=2, seq=8, dtype=torch.float32, device="cpu", steps=1, warmup=0,
                    rounds=2, prime=False)
    (rec,) = run_comparison({"x": method}, cfg)
    assert rec["status"] == "ok" and rec["rounds"] == 2
    assert rec["transfers"]["status"] == "failed" and "ring busy" in rec["transfers"]["error"]
    assert rec["transfers"]["failed_rounds"] == 2


def test_dpzo_plans_the_memory_of_zo2(zo_record):
    """The private step keeps B scalars per half beyond ZOSGD's state: the same memory plan."""
    results = _by_method(zo_record)
    for private, plain in (("dpzo", "zo2"), ("dpzo-offload", "zo2-offload")):
        strip = lambda plan: {k: v for k, v in plan.items() if k not in ("method", "optimizer")}  # noqa: E731
        assert strip(results[private]["plan"]) == strip(results[plain]["plan"])


def test_offload_methods_record_the_engine_plan(zo_record):
    for name in OFFLOAD:
        plan = _by_method(zo_record)[name]["offload_plan"]
        assert plan["ring_bytes"] > 0 and plan["num_blocks"] == 2 and plan["text"]


def test_every_method_has_one_definition_with_a_plan():
    assert set(METHODS) == {"adamw", "sgd", "mezo", "zo2", "zo2-offload", "zo2-offload-amp", "dpzo", "dpzo-offload",
                            "forward", "nondp", "flashdp", "opacus", "opacus-ghost"}
    for name, m in METHODS.items():
        assert m.name == name and callable(m.setup) and callable(m.plan)


def test_plan_needs_no_memory_for_huge_models(tmp_path):
    main(["plan", "--model", "opt-175b,llama2-70b", "--methods", "adamw,zo2,zo2-offload-amp", "--batch", "1",
          "--seq", "2048", "--dtype", "bfloat16", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results.json").read_text())
    plans = {(p["model"], p["method"]): p for p in record["plans"]}
    adamw, zo, off = (plans[("opt-175b", m)]["total_bytes"] for m in ("adamw", "zo2", "zo2-offload-amp"))
    assert off < zo < adamw
    assert zo >= 2 * 174.6e9  # bf16 weights of 174.6 B parameters
    assert record["command"].startswith("memtrain-bench plan") and "env" in record


def test_plan_prints_host_memory_beside_device_for_offload_rows_in_120_columns(tmp_path, capsys):
    """Every offload row shows host memory (pinned / pageable) from zo2.plan_offload, every row names the
    optimizer whose state it counts, and the table stays within 120 columns (parts on their own lines)."""
    import zo2
    from memtrain.bench.planner import cached_meta_model

    main(["plan", "--model", "opt-tiny", "--methods", "adamw,zo2,zo2-offload,zo2-offload-amp", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "results.json").read_text())
    plans = {p["method"]: p for p in record["plans"]}
    for amp in (False, True):
        plan = zo2.plan_offload(cached_meta_model("opt-tiny"), amp="bf16" if amp else None, device="cuda")
        host = plans["zo2-offload-amp" if amp else "zo2-offload"]["host_bytes"]
        assert (host["pinned"], host["pageable"]) == (plan.pinned_host_bytes, plan.pageable_host_bytes)
    assert "host_bytes" not in plans["adamw"] and "host_bytes" not in plans["zo2"]
    assert plans["adamw"]["optimizer"].startswith("AdamW") and plans["zo2"]["optimizer"].startswith("ZOSGD")
    rows = [line for line in out.splitlines() if line.startswith("opt-tiny")]
    assert len(rows) == 4 and all(len(line) <= 120 for line in out.splitlines())
    assert [row.split()[3] != "-" for row in rows] == [False, False, True, True]  # host column
    assert all("AdamW" in row or "ZOSGD" in row for row in rows)


def test_unknown_method_is_an_error_that_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["zo", "--methods", "adam"])
    assert "adamw" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--steps", "0"], ["--warmup", "-1"]])
def test_nonsense_counts_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        main(["zo", *bad])
    assert bad[0] in capsys.readouterr().err


def test_kernels_lists_and_dispatches(capsys):
    assert {"zo_perturb", "dp_clip_once"} <= set(kernel_scripts())
    main(["kernels"])
    assert "zo_perturb" in capsys.readouterr().out
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as done:
        main(["kernels", "zo_perturb", "--help"])  # the script's own argparse answers
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    assert sys.argv == argv
    with pytest.raises(SystemExit):
        main(["kernels", "no_such_kernel"])
    assert "dp_clip_once" in capsys.readouterr().err


def test_console_script(tmp_path):
    script = shutil.which("memtrain-bench") or str(pathlib.Path(sys.executable).with_name("memtrain-bench"))
    done = subprocess.run([script, "plan", "--model", "opt-tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "planned peak memory" in done.stdout
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"] == f"memtrain-bench plan --model opt-tiny --out {tmp_path}"


def test_python_m_memtrain_bench_runs_and_python_m_bench_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "memtrain.bench", "plan", "--model", "opt-tiny", "--methods", "zo2",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("python -m memtrain.bench plan --model opt-tiny")
    done = subprocess.run([sys.executable, "-m", "bench", "plan"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "memtrain-bench" in done.stderr


def test_no_sys_path_edits_in_bench():
    """The benchmarks run as the installed memtrain.bench; none of them edits the import path."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, offenders
