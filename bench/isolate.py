"""``--isolate``: each method's peak memory measured in a fresh process of its own.

In one process the peaks of successive methods are separated by resetting the high-water marks; a fresh
process per method needs no reset and also counts what a reset cannot separate (code pages, thread pools,
allocator caches): its peak is what a user running only that method would see. The parent runs
``python -m memtrain.bench.isolate CONFIG OUT`` once per method; the worker builds the model, sets the
method up, runs ``warmup`` + ``steps`` steps and writes one JSON record to OUT:

- ``peak_bytes``: the process's peak (host RSS high-water mark; on a GPU ``max_memory_allocated``);
- ``before_build_bytes``, ``after_setup_bytes``: the same counter before the model is built and after the
  method is set up (``peak_bytes - after_setup_bytes`` is what training adds);
- ``rss_peak_bytes`` (and on a GPU ``cuda_max_reserved_bytes``), ``step_times``, ``pid``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

import torch

from memtrain.memory import peak_rss_bytes, rss_bytes

from ._harness import time_once
from .catalogue import METHODS
from .run import RunConfig, error_record, make_workload


def _config_json(method: str, cfg: RunConfig) -> str:
    fields = asdict(cfg)
    fields["dtype"] = str(cfg.dtype).removeprefix("torch.")
    return json.dumps({"method": method, "config": fields})


def _config_from_json(text: str) -> tuple[str, RunConfig]:
    payload = json.loads(text)
    fields = payload["config"]
    fields["dtype"] = getattr(torch, fields["dtype"])
    return payload["method"], RunConfig(**fields)


def measure(method_name: str, cfg: RunConfig) -> dict:
    """Run one method in this process and read the process's own counters (never reset)."""
    cuda = cfg.device.startswith("cuda")

    def level() -> int:
        return torch.cuda.memory_allocated() if cuda else rss_bytes()

    record: dict = {"pid": os.getpid(), "kind": "cuda" if cuda else "rss"}
    try:
        method = METHODS[method_name]
        record["before_build_bytes"] = level()
        runner = method.setup(make_workload(cfg.model, cfg, method, cfg.batch, cfg.seq))
        record["after_setup_bytes"] = level()
        times = [time_once(runner.step, cfg.device) for _ in range(cfg.warmup + cfg.steps)][cfg.warmup:]
        record.update(status="ok", step_times=times,
                      peak_bytes=torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
                      rss_peak_bytes=peak_rss_bytes())
        if cuda:
            record["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        runner.close()
    except Exception as err:  # the record says what failed; the parent goes on with the next method
        record.update(error_record(err))
    return record


def run_isolated(method: str, cfg: RunConfig, timeout: float | None = None) -> dict:
    """Measure ``method`` in a fresh ``python -m memtrain.bench.isolate`` process; its record, or why none came."""
    with tempfile.TemporaryDirectory(prefix="memtrain-bench-") as tmp:
        out = os.path.join(tmp, "record.json")
        cmd = [sys.executable, "-m", "memtrain.bench.isolate", _config_json(method, cfg), out]
        try:
            # cwd: a checkout's own memtrain/ folder (which lacks memtrain.bench) must not shadow the install
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"the isolated process ran past {timeout} s"}
        if done.returncode != 0 or not os.path.exists(out):
            return {"status": "failed", "error": f"the isolated process exited with status {done.returncode}",
                    "stderr": done.stderr[-3000:]}
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m memtrain.bench.isolate CONFIG_JSON OUT_PATH``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m memtrain.bench.isolate CONFIG_JSON OUT_PATH (started by --isolate)")
    method, cfg = _config_from_json(args[0])
    record = measure(method, cfg)
    with open(args[1], "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
