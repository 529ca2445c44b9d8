"""memtrain-bench gpu-check on CPU: the record and report of a CPU run, a section that crashes, hangs or fails a
check is recorded as failed while the others run, the exit status, and the shapes the DP section builds."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import textwrap

import pytest
import torch

from memtrain.bench import gpu_check as GC
from memtrain.bench.cli import main
from memtrain.bench.gpu_sections_kernels import grid_limit_shape, offset_overflow_shape

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a run without CUDA reports")


@CPU_ONLY
def test_cpu_run_writes_record_and_report_with_skip_reasons(tmp_path, capsys):
    # limits x 8: this checks the record, not the speed of a loaded CI machine
    main(["gpu-check", "--out", str(tmp_path), "--sections", "env,gpu_tests,dp_precision,dp_speed,noise",
          "--timeout-scale", "8"])
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["schema"] == GC.SCHEMA and rec["subcommand"] == "gpu-check"
    assert rec["command"].startswith("memtrain-bench gpu-check") and rec["date"].endswith("Z")
    assert "commit" in rec["env"] and rec["env"]["device"] == "cpu"
    by_name = {s["name"]: s for s in rec["sections"]}
    assert list(by_name) == ["env", "gpu_tests", "dp_precision", "dp_speed", "noise"]
    assert by_name["env"]["status"] == "ok" and "torch" in by_name["env"]["result"]["report"]
    assert rec["failed"] == []
    for name in ("gpu_tests", "dp_precision", "dp_speed", "noise"):
        assert by_name[name]["status"] == "skipped" and by_name[name]["reason"], name
        assert rec["skipped"][name] == by_name[name]["reason"]
    assert all(c["ok"] for c in by_name["noise"]["result"]["checks"])  # the CPU self-check ran
    report = (tmp_path / "gpu_check.md").read_text()
    assert "## skipped" in report and "nothing failed" in report
    for name, reason in rec["skipped"].items():
        assert f"- {name}: {reason}" in report
    assert report in capsys.readouterr().out


SECTIONS_SRC = '''
import os
import pathlib
import time

def boom():
    raise ValueError("planted failure")

def hang():
    time.sleep(60)

def fine():
    return {"value": 1, "figures": [{"name": "planted figure", "value": 0.5}]}

def bad_check():
    return {"checks": [{"name": "planted check", "ok": False, "value": 2, "bound": 1}]}

def skip():
    return {"status": "skipped", "reason": "planted reason"}

def export():
    return {"exports": {"GPU_CHECK_TEST_VAR": "built"}}

def read():
    return {"value": os.environ.get("GPU_CHECK_TEST_VAR")}

def lock():  # a build that dies while it holds torch's extension lock
    import pathlib
    lock = pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "memtrain_dp_clip" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os._exit(9)

def env():
    import pathlib
    root = pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return {"ext_dir": str(root), "locks": [str(p) for p in root.glob("*/lock")],
            "quick": os.environ.get("MEMTRAIN_GPU_CHECK_QUICK")}
'''


@pytest.fixture
def fake_sections(tmp_path, monkeypatch):
    (tmp_path / "fake_gpu_sections.py").write_text(textwrap.dedent(SECTIONS_SRC))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return [GC.Section(name, f"fake_gpu_sections:{name}", 2 if name == "hang" else 40, name)
            for name in ("boom", "hang", "fine", "bad_check", "skip", "export", "read", "lock", "env")]


def test_failed_sections_are_recorded_and_the_rest_run(tmp_path, fake_sections):
    code = GC.run_gpu_check(tmp_path / "out", sections=[s for s in fake_sections if s.name not in ("lock", "env")])
    assert code == 1
    rec = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    s = {r["name"]: r for r in rec["sections"]}
    assert s["boom"]["status"] == "failed" and "ValueError: planted failure" in s["boom"]["stderr_tail"]
    assert s["hang"]["status"] == "failed" and "timed out after 3 s" in s["hang"]["reason"]  # 1.5 x its 2 s
    assert s["hang"]["seconds"] < 30  # killed at its timeout, not after the minute it sleeps
    assert s["fine"]["status"] == "ok" and s["fine"]["result"]["value"] == 1
    assert s["bad_check"]["status"] == "failed" and "planted check" in s["bad_check"]["reason"]
    assert s["skip"]["status"] == "skipped" and rec["skipped"] == {"skip": "planted reason"}
    assert rec["failed"] == ["boom", "hang", "bad_check"]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "FAILED: boom, hang, bad_check" in report and "planted failure" in report
    assert "- planted figure: 0.5" in report


def test_exports_reach_the_sections_after(tmp_path, fake_sections, monkeypatch):
    monkeypatch.delenv("GPU_CHECK_TEST_VAR", raising=False)
    by_name = {s.name: s for s in fake_sections}
    assert GC.run_gpu_check(tmp_path, sections=[by_name["read"], by_name["export"], by_name["read"]]) == 0
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["result"].get("value") for s in rec["sections"]] == [None, None, "built"]


def test_exit_status(tmp_path, fake_sections, monkeypatch):
    by_name = {s.name: s for s in fake_sections}
    monkeypatch.setattr(GC, "SECTIONS", fake_sections)
    main(["gpu-check", "--out", str(tmp_path / "ok"), "--sections", "fine,skip"])  # returns: exit status 0
    with pytest.raises(SystemExit) as exc:
        main(["gpu-check", "--out", str(tmp_path / "bad"), "--sections", "fine,boom"])
    assert exc.value.code == 1
    assert by_name["fine"].target.endswith(":fine")
    with pytest.raises(SystemExit) as exc:
        main(["gpu-check", "--sections", "nonesuch"])
    assert exc.value.code == 2  # argparse's usage error, naming the sections


def test_cold_estimates_fit_the_budgets():
    """A full run's cold estimates within 8 minutes, --quick's within its 4-minute cut-off, with room to spare for
    a machine slower than the estimates (the limits, 1.5 x, are cut by the run's budget)."""
    assert GC.ESTIMATE_BUDGET_S == 8 * 60 and GC.QUICK_BUDGET_S == 4 * 60 and GC.BUDGET_S == 10 * 60
    assert GC.planned_seconds(GC.SECTIONS) <= GC.ESTIMATE_BUDGET_S
    quick = [s for s in GC.SECTIONS if s.quick]
    assert GC.planned_seconds(quick, quick=True) <= 0.9 * GC.QUICK_BUDGET_S
    assert {s.name for s in quick} == {"cuda_build", "gpu_tests", "dp_precision"}  # correctness only
    assert all(s.limit() == GC.LIMIT_FACTOR * s.estimate_s > s.estimate_s for s in GC.SECTIONS)
    assert len({s.name for s in GC.SECTIONS}) == len(GC.SECTIONS)
    doc = GC.__doc__
    for s in GC.SECTIONS:  # the docstring gives each estimate and what it is made of
        assert f"- {s.name} {s.estimate_s:g}" in doc, s.name


def test_the_run_stops_at_its_budget(tmp_path, fake_sections, monkeypatch):
    """A section gets at most the time left, and one that would start past the budget is skipped saying so."""
    by_name = {s.name: s for s in fake_sections}
    monkeypatch.setattr(GC, "_environment", lambda timeout_s: {"device": "cpu"})  # tested below
    monkeypatch.setattr(GC, "BUDGET_S", 8)  # the 40 s-estimate hang is cut at the budget
    slow_hang = GC.Section("hang", "fake_gpu_sections:hang", 40, "hang")
    assert GC.run_gpu_check(tmp_path, sections=[slow_hang, by_name["fine"]]) == 1
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    hang, fine = rec["sections"]
    assert hang["status"] == "failed" and hang["timeout_s"] <= 8 and hang["seconds"] < 20
    assert fine["status"] == "skipped" and "budget was spent" in fine["reason"]


def test_quick_runs_the_quick_sections_and_tells_them(tmp_path, fake_sections):
    by_name = {s.name: s for s in fake_sections}
    sections = [dataclasses.replace(by_name["env"], quick=True), by_name["fine"]]
    assert GC.run_gpu_check(tmp_path, sections=sections, quick=True) == 0
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in rec["sections"]] == ["env"] and rec["config"]["quick"] is True
    assert rec["sections"][0]["result"]["quick"] == "1" and rec["config"]["budget_s"] == GC.QUICK_BUDGET_S


def test_a_killed_build_leaves_no_lock_for_the_sections_after(tmp_path, fake_sections):
    """Each run builds in its own extensions directory; a lock left by a section killed mid-build is cleared
    before the next section starts, and the directory is gone after the run."""
    by_name = {s.name: s for s in fake_sections}
    assert GC.run_gpu_check(tmp_path, sections=[by_name["lock"], by_name["env"]]) == 1
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    killed, after = rec["sections"]
    assert killed["status"] == "failed" and killed["cleared_locks"] == [
        os.path.join(after["result"]["ext_dir"], "memtrain_dp_clip", "lock")]
    assert after["result"]["locks"] == [] and after["result"]["quick"] == "0"
    assert "memtrain-gpu-check-extensions-" in after["result"]["ext_dir"]
    assert not os.path.exists(after["result"]["ext_dir"])


def test_the_parent_never_touches_cuda(tmp_path, fake_sections, monkeypatch):
    """The device is queried in a child: any CUDA call in this process would create a context (HBM, and a
    refusal of every section under EXCLUSIVE_PROCESS)."""
    def poisoned(*a, **k):
        raise AssertionError("gpu-check's parent process called into CUDA")

    for name in ("is_available", "device_count", "init", "_lazy_init", "get_device_name", "get_device_properties",
                 "current_device", "mem_get_info", "set_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, poisoned)
    by_name = {s.name: s for s in fake_sections}
    assert GC.run_gpu_check(tmp_path, sections=[by_name["fine"]], timeout_scale=8) == 0  # x 8: a loaded machine
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["env"]["device"] in ("cpu", "cuda") and rec["env"]["device_name"] and "report" in rec["env"]


def test_gpu_tests_select_gpu_and_not_slow_over_the_files_with_gpu_tests(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]  # this checkout, whether memtrain is installed from it or not
    files = GC.gpu_test_files(root)
    assert "tests/zo2/test_offload_gpu.py" in files and "tests/kernels/test_philox.py" in files
    assert "tests/zo2/test_plan.py" not in files and "tests/bench/test_gpu_check.py" not in files
    for f in files:
        assert "@pytest.mark.gpu" in (root / f).read_text() or "pytestmark = pytest.mark.gpu" in (root / f).read_text()
    cmd = GC.gpu_tests_command(root, files, tmp_path / "j.xml")
    assert cmd[cmd.index("-m", 2) + 1] == "gpu and not slow" and cmd[-len(files):] == [str(root / f) for f in files]
    # what pytest selects with it, run as the section runs it: the gpu tests of those files, none of the slow ones
    head = [c for c in cmd[:-len(files)] if c != "-v" and not c.startswith("--junitxml")]
    proc = subprocess.run([*head, "--collect-only", "-q", *cmd[-len(files):]], cwd=GC.GPU_TESTS_CWD,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_cuda_offload_follows_plain_zosgd" in i for i in ids)
    assert any("test_cuda_precision_against_float64" in i for i in ids)
    assert not any("test_cuda_beyond_2_31_elements" in i or "test_cuda_at_the_limits" in i for i in ids)  # slow
    assert not any("test_known_answers_numpy_and_torch" in i for i in ids)  # not gpu-marked


def test_gpu_tests_without_the_test_extra_skip_naming_the_fix(monkeypatch):
    import memtrain.bench._harness as H
    import memtrain.requirements as R

    monkeypatch.setattr(R, "unmet_requirements", lambda extra=None: ["hypothesis (needs hypothesis<7,>=6; "
                                                                      "not installed)"])
    # a wheel install has no checkout of its own: give it this one, so the requirement check is what decides
    monkeypatch.setattr(H, "own_checkout", lambda: pathlib.Path(__file__).resolve().parents[2])
    res = GC.section_gpu_tests()
    assert res["status"] == "skipped" and "hypothesis (needs" in res["reason"]
    assert 'pip install --no-build-isolation -e ".[test]"' in res["reason"]


def test_dp_shapes_are_the_smallest_that_cross_the_old_limits():
    B, T, d_in, d_out = grid_limit_shape()
    assert (B, d_in, d_out) == (1, 4096, 32000)
    tiles = math.ceil(T / 16)  # the old ghost grid's axis 1 was tiles², limit 65535
    assert tiles**2 > 65535 and math.ceil((T - 1) / 16) ** 2 <= 65535
    B, T, d_in, V = offset_overflow_shape()
    assert V == 128256 and B * T * V >= 2**31 > B * (T - 1) * V
