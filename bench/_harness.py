"""Shared benchmark plumbing: timing, environment capture, the printed table and the JSON record.

Every comparison runs its methods in the same process, interleaved round by round (method A, B, C,
then A, B, C again ...), so that a noisy machine slows all of them alike and the ratios hold.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call: CUDA events on a GPU, perf_counter on CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(methods: dict[str, Callable[[], object]], rounds: int, warmup: int, device: str) -> dict:
    """Median, p20 and p80 seconds of each method, timed round-robin after ``warmup`` untimed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(warmup + rounds):
        for name, fn in methods.items():
            t = time_once(fn, device)
            if r >= warmup:
                samples[name].append(t)
    return {name: quantiles(ts) for name, ts in samples.items()}


def quantiles(ts: list[float]) -> dict:
    s = sorted(ts)

    def q(f: float) -> float:
        return s[min(len(s) - 1, int(f * len(s)))]

    return {"median_s": q(0.5), "p20_s": q(0.2), "p80_s": q(0.8), "samples_s": ts}


def git_sha() -> str:
    """The checkout's commit, with ``-dirty`` when it has uncommitted changes ('unknown' outside a checkout)."""
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=RESULTS.parent,
                                  check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--", ".") else "")
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def gpu_driver() -> str:
    """The NVIDIA driver version from nvidia-smi ('none' without one)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "none"


def environment(device: str) -> dict:
    from memtrain.env_report import report

    env = report()
    env.update({
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(torch.get_num_threads()),
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench_device": device,
        "device_name": device_name(device),
        "driver": gpu_driver(),
    })
    if device.startswith("cuda"):
        env["cuda_runtime"] = str(torch.version.cuda)
        env["gpu_memory_bytes"] = str(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return env


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, record: dict, out: str | None = None) -> pathlib.Path:
    path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
    return path
