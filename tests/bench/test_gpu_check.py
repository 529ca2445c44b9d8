"""memtrain-bench gpu-check on CPU: the record and report of a CPU run, a section that crashes, hangs or fails a
check is recorded as failed while the others run, the exit status, and the shapes the DP section builds."""

import json
import math
import os
import textwrap

import pytest
import torch

from memtrain.bench import gpu_check as GC
from memtrain.bench.cli import main
from memtrain.bench.gpu_sections_kernels import grid_limit_shape, offset_overflow_shape

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a run without CUDA reports")


@CPU_ONLY
def test_cpu_run_writes_record_and_report_with_skip_reasons(tmp_path, capsys):
    main(["gpu-check", "--out", str(tmp_path), "--sections", "env,gpu_tests,dp_precision,dp_speed,noise"])
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
'''


@pytest.fixture
def fake_sections(tmp_path, monkeypatch):
    (tmp_path / "fake_gpu_sections.py").write_text(textwrap.dedent(SECTIONS_SRC))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return [GC.Section(name, f"fake_gpu_sections:{name}", 3 if name == "hang" else 60, name)
            for name in ("boom", "hang", "fine", "bad_check", "skip", "export", "read")]


def test_failed_sections_are_recorded_and_the_rest_run(tmp_path, fake_sections):
    code = GC.run_gpu_check(tmp_path / "out", sections=fake_sections)
    assert code == 1
    rec = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    s = {r["name"]: r for r in rec["sections"]}
    assert s["boom"]["status"] == "failed" and "ValueError: planted failure" in s["boom"]["stderr_tail"]
    assert s["hang"]["status"] == "failed" and "timed out after 3 s" in s["hang"]["reason"]
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


def test_default_timeouts_fit_the_budget():
    assert sum(s.timeout_s for s in GC.SECTIONS) < GC.BUDGET_S <= 8 * 60
    assert len({s.name for s in GC.SECTIONS}) == len(GC.SECTIONS)


def test_dp_shapes_are_the_smallest_that_cross_the_old_limits():
    B, T, d_in, d_out = grid_limit_shape()
    assert (B, d_in, d_out) == (1, 4096, 32000)
    tiles = math.ceil(T / 16)  # the old ghost grid's axis 1 was tiles², limit 65535
    assert tiles**2 > 65535 and math.ceil((T - 1) / 16) ** 2 <= 65535
    B, T, d_in, V = offset_overflow_shape()
    assert V == 128256 and B * T * V >= 2**31 > B * (T - 1) * V
