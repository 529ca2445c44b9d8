"""Benchmark plumbing shared by every command: the timing loop, the provenance of a record, table and JSON.

Timing. Methods are interleaved round by round in one process, the order reversed every other round
(A B C, C B A, A B C ...), so that load on a shared machine slows every method alike and the ratios hold,
and no method always runs first (a drift in the load cancels over two rounds); each round gives one
sample per method, and a method is summarised by the median and the 20th/80th percentiles of its
samples. A sample is timed once: CUDA events on a GPU (after a device-wide synchronisation, so that work
on side streams counts), ``time.perf_counter`` on the CPU. Whole training steps change state and take
seconds, so they are not handed to ``torch.utils.benchmark`` or ``triton.testing.do_bench``, which call a
statement many times; the kernel micro-benchmarks (``memtrain.bench.kernels``) use those.

Provenance. :func:`provenance` gives what a reader needs to trust a record: the command as run, the UTC
date, and :func:`environment` (CPU model, cores, versions, device and driver, the git commit and whether
the tree was dirty).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import torch

from .trust import load_state, trust_warnings

T = TypeVar("T")
PACKAGE = pathlib.Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call of ``fn``: CUDA events around it on a GPU, perf_counter on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        torch.cuda.synchronize()  # work left on side streams (the offload engine's copies) belongs to this call
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(methods: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Call every method once per round for ``rounds`` rounds, in order and reversed by turns (A B C, C B A,
    A B C ...): the one loop. Results keep the methods' order, one entry per round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out: dict[str, list[T]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(methods[name]())
    return out


def summarize(samples: list[float]) -> dict:
    """Median, p20 and p80 of the samples (linear interpolation), with the samples and their count."""
    if not samples:
        raise ValueError("summarize: no samples")
    p20, median, p80 = (float(v) for v in np.percentile(samples, [20, 50, 80]))
    return {"median": median, "p20": p20, "p80": p80, "rounds": len(samples), "samples": list(samples)}


def round_ratios(numerators: list[float], denominators: list[float]) -> dict | None:
    """:func:`summarize` of ``numerators[i] / denominators[i]``, round by round (the two samples of a round saw
    the same load); None when the counts differ (a round failed, so rounds no longer pair up)."""
    if len(numerators) != len(denominators):
        return None
    return summarize([a / b for a, b in zip(numerators, denominators, strict=True)])


def interleaved(methods: Mapping[str, Callable[[], object]], rounds: int, warmup: int, device: str) -> dict:
    """Time callables round-robin; ``warmup`` untimed rounds first. Returns :func:`summarize` per name (seconds)."""
    timed = {name: (lambda fn=fn: time_once(fn, device)) for name, fn in methods.items()}
    samples = interleave(timed, warmup + rounds)
    return {name: summarize(ts[warmup:]) for name, ts in samples.items()}


# ------------------------------------------------------------------------------------------- provenance
def _git(where: pathlib.Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def own_checkout() -> pathlib.Path | None:
    """The root of the memtrain checkout this code runs from (an editable install), or None (a wheel)."""
    try:
        top = pathlib.Path(_git(PACKAGE, "rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.SubprocessError):
        return None
    # a repository that merely encloses an installed copy (a venv inside some checkout) is not ours
    return top if (top / "bench" / "_harness.py").resolve() == pathlib.Path(__file__).resolve() else None


def git_state(where: pathlib.Path | None = None) -> tuple[str | None, bool | None]:
    """(commit SHA, 40 hex; whether the working tree differs from it, untracked files included) of the git
    checkout at ``where`` (default: :func:`own_checkout`); (None, None) where there is none."""
    where = where or own_checkout()
    if where is None:
        return None, None
    try:
        sha = _git(where, "rev-parse", "--verify", "HEAD")
        dirty = bool(_git(where, "status", "--porcelain", "--untracked-files=normal"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, dirty


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (None without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """The machine, the software and the checkout a measurement ran on."""
    import psutil

    from memtrain.env_report import report

    commit, dirty = git_state()
    cuda = device.startswith("cuda")
    env = {
        "commit": commit,
        "dirty": dirty,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        **load_state(psutil.cpu_count(logical=False) or os.cpu_count()),
        "host_memory_bytes": psutil.virtual_memory().total,
        "memtrain": _version("memtrain"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "opacus": _version("opacus"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_model(),
        "driver": gpu_driver() if cuda else None,
        "cuda": torch.version.cuda,
    }
    if cuda:
        env["device_memory_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    env["report"] = report()  # memtrain.env_report: extension status and each kernel's backend
    return env


def command_line(argv: list[str] | None = None) -> str:
    """The command as run, ``memtrain-bench ...`` or ``python -m memtrain.bench... ...``.

    ``argv``: the arguments given to ``memtrain-bench`` when it is called as a function (tests, notebooks);
    the record then shows the equivalent command line.
    """
    if argv is not None:
        return shlex.join(["memtrain-bench", *argv])
    orig = list(getattr(sys, "orig_argv", sys.argv))
    i = 1
    while i < len(orig) and orig[i].startswith("-") and orig[i] != "-m":
        i += 2 if orig[i] in ("-X", "-W") else 1  # the interpreter's own options
    if i < len(orig) and pathlib.Path(orig[i]).name == "memtrain-bench":
        return shlex.join(["memtrain-bench", *orig[i + 1:]])
    return shlex.join(["python", *orig[i:]])  # python -m MODULE ... or python SCRIPT ...


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(device: str, argv: list[str] | None = None, rounds: int | None = None) -> dict:
    """``command`` (as run), ``argv``, ``date`` (UTC), ``env`` and ``warnings`` (:func:`trust_warnings`, each
    also printed): the head of every JSON record. ``rounds``: the rounds of a comparison, if the run makes one."""
    args = list(argv) if argv is not None else list(sys.argv[1:])
    env = environment(device)
    warnings = trust_warnings(env, rounds)
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    return {"command": command_line(argv), "argv": args, "date": utc_now(), "env": env, "warnings": warnings}


# ---------------------------------------------------------------------------------------------- output
def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, record: dict, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Write ``record`` (indented) to ``out``, default ``bench/results/<name>.json``; prints where."""
    path = pathlib.Path(out) if out else PACKAGE / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")
    return path
