"""``--isolate``: each method's peak memory comes from a fresh process of its own (CPU, tiny preset)."""

import json
import os
import subprocess

import pytest
import torch

from memtrain.bench import isolate
from memtrain.bench.cli import main
from memtrain.bench.run import RunConfig


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("isolate")
    main(["dp", "--model", "llama-tiny", "--trainable", "linear", "--methods", "nondp,flashdp", "--isolate",
          "--rounds", "1", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--no-plots",
          "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def test_each_method_gets_a_process_of_its_own(record):
    isolated = [r["isolated"] for r in record["results"]]
    assert [i["status"] for i in isolated] == ["ok", "ok"], isolated
    pids = {i["pid"] for i in isolated}
    assert len(pids) == 2 and os.getpid() not in pids


def test_isolated_record_holds_the_process_peak(record):
    for r in record["results"]:
        iso = r["isolated"]
        assert iso["kind"] == "rss"
        # the process peak covers the model build and the training steps that followed it
        assert iso["peak_bytes"] >= iso["after_setup_bytes"] > iso["before_build_bytes"] > 0
        assert iso["rss_peak_bytes"] == iso["peak_bytes"]
        assert len(iso["step_times"]) == 1
    # the interleaved in-process measurement is still there beside it
    assert all(r["status"] == "ok" and r["rounds"] == 1 for r in record["results"])


def test_a_method_failing_in_the_worker_is_reported():
    cfg = RunConfig(model="no-such-model", batch=2, seq=8, dtype=torch.float32, device="cpu", steps=1, warmup=0)
    rec = isolate.measure("zo2", cfg)
    assert rec["status"] == "failed" and "no-such-model" in rec["error"] and rec["pid"] == os.getpid()


def test_a_worker_that_dies_is_reported(monkeypatch):
    """A worker killed before it writes its record (the OOM killer, say) gives a failed record with its stderr."""
    def killed(cmd, **kw):
        assert cmd[1:3] == ["-m", "memtrain.bench.isolate"]
        return subprocess.CompletedProcess(cmd, -9, "", "Killed")

    monkeypatch.setattr(isolate.subprocess, "run", killed)
    cfg = RunConfig(model="opt-tiny", batch=2, seq=8, dtype=torch.float32, device="cpu", steps=1, warmup=0)
    rec = isolate.run_isolated("zo2", cfg)
    assert rec["status"] == "failed" and "-9" in rec["error"] and rec["stderr"] == "Killed"


def test_config_round_trips_through_the_command_line():
    cfg = RunConfig(model="opt-tiny", batch=3, seq=8, dtype=torch.bfloat16, device="cpu", steps=2, warmup=1,
                    trainable="linear", options={"prefetch": 2})
    assert isolate._config_from_json(isolate._config_json("zo2", cfg)) == ("zo2", cfg)
