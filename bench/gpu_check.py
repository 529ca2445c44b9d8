"""``memtrain-bench gpu-check``: the one command that verifies the GPU paths on a single H100/H200.

Each section runs in a fresh interpreter with its own timeout (a section that hangs or crashes is
recorded as failed with the tail of its stderr, and the others still run). A section is a function
``() -> dict`` named ``"module:function"``; it returns its measurements, optionally with

- ``status``: "ok" (default), "skipped" (with ``reason``: what it needs that is missing) or "failed";
- ``checks``: correctness checks ``{"name", "ok", "value", "bound"}``; any false ``ok`` fails the section;
- ``goals``: performance goals ``{"name", "met", "value", "goal"}``, reported, never a failure;
- ``figures``: the few measured values the report shows (``{"name", "value"}``), the rest being in the JSON;
- ``exports``: environment variables for the sections after it (e.g. whether a CUDA build succeeded, so
  that later sections neither rebuild nor retry it).

Without CUDA the sections that can run do (environment report, CPU noise self-check, the memory plans)
and the others say why they were skipped. The run writes ``gpu_check.json`` (the bench schema: command,
date, provenance) and ``gpu_check.md`` into ``--out``, prints the report, and exits 1 if any section
failed.

Budget. Each section carries a cold-cache estimate on one H100 with 16 cores: no Triton cache, no torch
extension cache, nothing in the page cache (every run builds the CUDA kernel anew in its own extensions
directory). The estimates sum to at most 8 minutes (``ESTIMATE_BUDGET_S``); a section's limit is its
estimate × ``LIMIT_FACTOR`` (a machine slower than the estimate still passes, a hang is cut), and the run
as a whole stops starting sections at ``BUDGET_S`` (10 minutes): a section that would start later is
skipped with that reason, one running then gets only the time left. ``--quick`` runs the correctness
sections only (the CUDA build, the GPU tests, the DP kernels at the grid-limit shape): estimates 205 s,
cut at ``QUICK_BUDGET_S`` (4 minutes), for a window that has little left. ``--timeout-scale``
multiplies every limit and the run's budget.

Cold estimates (seconds), and what they are made of:

- provenance (the run's environment record, in a child) 10: importing torch and transformers cold.
- env 10: the same imports and the report.
- cuda_build 60: ninja compiles csrc/dp_clip_binding.cpp (torch/extension.h, ~40 s) and csrc/dp_clip.cu (c10
  headers only, ~15 s) in parallel, for the present GPU's architecture, then links and loads.
- gpu_tests 110: ``pytest -m "gpu and not slow"`` over the files that hold GPU tests: collection ~10 s,
  ~40 cold Triton compiles (the DP kernels' autotuned configurations per dtype and layout, the noise kernels
  per dtype) at 1-2 s each, the small offload models ~20 s.
- dp_precision 45 (25 under ``--quick``, without the 2^31-element shape): float64 per-sample references at
  the grid-limit shape (T = 4081, 4096 x 32000) in fp32 and bf16, and at B·T·V ≥ 2^31 (4 GiB of bf16 inputs).
- dp_speed 45: the DP micro-benchmarks at Llama-7B shapes, autotuning ~10 configurations per kernel cold.
- noise 20: 2^22 elements CPU vs GPU per distribution and dtype, 2^28-element bandwidth rounds.
- zo2_offload 60: 4 configurations x (undelayed, delayed) x 3 steps of a 2048x8 OPT, then timing rounds.
- opt_1_3b 35: a 1.3B model filled on the host (5 GiB fp32), 5 interleaved rounds.
- opt_13b 70: a 13B model filled on the host (52 GiB fp32) and pinned, two offloaded steps.

The parent process never touches CUDA (the record's environment, device name included, comes from a
child): it holds no context, so no HBM, and sections start under the EXCLUSIVE_PROCESS compute mode.

"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ._harness import write_json

SCHEMA = "memtrain-bench/gpu-check/1"
TAIL_CHARS = 3000  # stderr kept from a failed section: its traceback's end
LIMIT_FACTOR = 1.5  # a section's limit over its cold-cache estimate
ESTIMATE_BUDGET_S = 8 * 60  # the cold estimates of a full run, provenance included, sum to at most this
BUDGET_S = 10 * 60  # no section starts, and none runs, past this (at --timeout-scale 1)
QUICK_BUDGET_S = 4 * 60  # the same for --quick
PROVENANCE_ESTIMATE_S = 10  # the child that records the environment (see the module docstring)
QUICK_ENV = "MEMTRAIN_GPU_CHECK_QUICK"  # "1" in the sections of a --quick run
GPU_TESTS_MARK = "gpu and not slow"  # replaces addopts' -m: the slow 2^31-element tests stay out


@dataclass(frozen=True)
class Section:
    """One section: its name, the ``module:function`` that runs it, its cold-cache estimate (the module
    docstring says what it is made of), whether ``--quick`` runs it, and its estimate there if smaller."""

    name: str
    target: str
    estimate_s: float
    title: str
    quick: bool = False
    quick_estimate_s: float | None = None

    def estimate(self, quick: bool = False) -> float:
        return self.quick_estimate_s if quick and self.quick_estimate_s is not None else self.estimate_s

    def limit(self, quick: bool = False) -> float:
        """The section's timeout at --timeout-scale 1."""
        return LIMIT_FACTOR * self.estimate(quick)


_K = "memtrain.bench.gpu_sections_kernels"
_Z = "memtrain.bench.gpu_sections_zo2"
SECTIONS: list[Section] = [
    Section("env", "memtrain.bench.gpu_check:section_env", 10, "environment report (python -m memtrain.env_report)"),
    Section("cuda_build", f"{_K}:section_cuda_build", 60,
            "build the cooperative dp_clip_once CUDA kernel once (this run's extensions directory) for the sections "
            "after", quick=True),
    Section("gpu_tests", "memtrain.bench.gpu_check:section_gpu_tests", 110,
            f"pytest -m '{GPU_TESTS_MARK}' on the checkout's files that hold GPU tests", quick=True),
    Section("dp_precision", f"{_K}:section_dp_precision", 45,
            "DP kernels on CUDA against float64: grid-limit and 2^31-offset shapes (grid-limit only with --quick)",
            quick=True, quick_estimate_s=25),
    Section("dp_speed", f"{_K}:section_dp_speed", 45,
            "DP kernels against cuBLAS at Llama-7B shapes (bf16, B=8, T=512)"),
    Section("noise", f"{_K}:section_noise", 20, "Philox/zo_perturb noise: CPU vs GPU per dtype, fused pass bandwidth"),
    Section("zo2_offload", f"{_Z}:section_zo2_offload", 60,
            "zo2 offload vs plain ZOSGD, synthetic OPT 2048x8, prefetch 0/1/2 and AMP, with copy delays"),
    Section("opt_1_3b", f"{_Z}:section_opt_1_3b", 35, "OPT-1.3B step ratio offloaded / plain"),
    Section("opt_13b", f"{_Z}:section_opt_13b", 70, "OPT-13B offloaded step peak (B=1, T=2048, bf16 AMP)"),
]


def planned_seconds(sections: list[Section], quick: bool = False) -> float:
    """The cold-cache estimate of a run of ``sections``, the provenance child included."""
    return PROVENANCE_ESTIMATE_S + sum(s.estimate(quick) for s in sections)


# ------------------------------------------------------------------------------------------- sections
def section_env() -> dict:
    """memtrain.env_report's content (versions, extension, kernel backends, flashdp dispatch)."""
    from memtrain.env_report import report

    return {"report": report()}


def section_provenance() -> dict:
    """The record's ``env`` (device name and memory included), taken here so the parent never touches CUDA."""
    import torch

    from ._harness import environment

    return {"environment": environment("cuda" if torch.cuda.is_available() else "cpu")}


# a test marked gpu: the decorator, the module's pytestmark, or a parameter's marks=
_GPU_MARK = re.compile(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\s*=.*\bpytest\.mark\.gpu\b|marks=.*\bpytest\.mark\.gpu\b",
                       re.MULTILINE)


def gpu_test_files(root: pathlib.Path) -> list[str]:
    """The test files under ``root/tests`` that mark a test ``gpu``, relative to ``root``: pytest collects
    only these (importing every test module would cost more than the GPU tests themselves)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                  if _GPU_MARK.search(p.read_text(encoding="utf-8", errors="replace")))


def gpu_tests_command(root: pathlib.Path, files: list[str], junit: pathlib.Path) -> list[str]:
    """``pytest -m GPU_TESTS_MARK`` over ``files`` of the checkout at ``root`` (a later ``-m`` replaces addopts'
    own), run from outside the checkout (:data:`GPU_TESTS_CWD`): ``python -m`` puts its working directory first
    on the import path, where the checkout's ``kernels/`` folder would shadow the ``kernels`` package transformers
    imports."""
    return [sys.executable, "-m", "pytest", "--rootdir", str(root), "-c", str(root / "pyproject.toml"),
            "-m", GPU_TESTS_MARK, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}",
            *(str(root / f) for f in files)]


GPU_TESTS_CWD = tempfile.gettempdir()


def section_gpu_tests() -> dict:
    """``pytest -m "gpu and not slow"`` on the checkout this code runs from (an installed wheel carries no
    tests), over the files that hold GPU tests; skipped, naming what to install, without the test extra."""
    import torch

    from memtrain.requirements import unmet_requirements

    from ._harness import own_checkout

    root = own_checkout()
    if root is None or not (root / "tests").is_dir():
        return {"status": "skipped", "reason": "no memtrain checkout with tests/ beside this installation "
                "(an installed wheel carries no tests): run from an editable install of the checkout"}
    unmet = unmet_requirements("test")
    if unmet:  # the suite's session-start check would exit 4 with the same list
        return {"status": "skipped", "reason": "the test extra is not installed (" + "; ".join(unmet) + "): "
                'pip install --no-build-isolation -e ".[test]" in the checkout, then rerun'}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: every gpu-marked test would be skipped"}
    junit = pathlib.Path(tempfile.mkdtemp()) / "gpu.xml"
    files = gpu_test_files(root)
    # pytest's lines go to this section's stderr: if the section times out, its tail names the test that hung
    proc = subprocess.run(gpu_tests_command(root, files, junit), cwd=GPU_TESTS_CWD, stdout=sys.stderr,
                          stderr=subprocess.STDOUT)
    counts = _junit_counts(junit)
    ok = proc.returncode == 0 and counts.get("tests", 0) > 0
    summary = f"pytest exit {proc.returncode}, " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return {"status": "ok" if ok else "failed", "returncode": proc.returncode, "files": files, **counts,
            "checks": [{"name": f"pytest -m '{GPU_TESTS_MARK}' passes", "ok": ok, "value": summary,
                        "bound": "exit 0, >= 1 test"}]}


def _junit_counts(path: pathlib.Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


# ---------------------------------------------------------------------------------------------- runner
def _worker(target: str, result: str) -> None:
    """In the section's own interpreter: run ``module:function`` and write what it returns as JSON."""
    module, _, func = target.partition(":")
    out = getattr(importlib.import_module(module), func)()
    pathlib.Path(result).write_text(json.dumps(out, default=str))


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:]


def run_section(section: Section, timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """Run one section in a subprocess (its own session, so a hung section's children die with it), with
    ``env`` added to the environment."""
    fd, result = tempfile.mkstemp(suffix=".json", prefix=f"gpu-check-{section.name}-")
    os.close(fd)
    cmd = [sys.executable, "-m", "memtrain.bench.gpu_check", "--worker", section.target, result]
    rec: dict = {"name": section.name, "title": section.title, "timeout_s": timeout_s}
    t0 = time.perf_counter()
    # cwd: a checkout's own memtrain/ folder (which lacks memtrain.bench) must not shadow the installed package
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir())
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        rec.update(status="failed", reason=f"timed out after {timeout_s:.0f} s", stderr_tail=_tail(err or ""))
        rec["seconds"] = time.perf_counter() - t0
        return rec
    finally:
        rec["seconds"] = time.perf_counter() - t0
    rec["returncode"] = proc.returncode
    text = pathlib.Path(result).read_text() if os.path.getsize(result) else ""
    os.unlink(result)
    if proc.returncode != 0 or not text:
        rec.update(status="failed", reason=f"exited with status {proc.returncode}", stderr_tail=_tail(err or ""))
        return rec
    body = json.loads(text)
    status = body.pop("status", "ok")
    bad = [c["name"] for c in body.get("checks", []) if not c.get("ok")]
    if bad and status == "ok":
        status = "failed"
        body.setdefault("reason", f"check(s) failed: {', '.join(bad)}")
    rec.update(status=status, result=body)
    if "reason" in body:
        rec["reason"] = body.pop("reason")
    if status == "failed":
        rec["stderr_tail"] = _tail(err or "")
    return rec


def _summary(rec: dict) -> str:
    """One line of what a section found, for the report."""
    res = rec.get("result") or {}
    checks = res.get("checks", [])
    goals = res.get("goals", [])
    parts = []
    if checks:
        parts.append(f"{sum(c['ok'] for c in checks)}/{len(checks)} checks")
    if goals:
        parts.append(f"{sum(bool(g['met']) for g in goals)}/{len(goals)} goals met")
    if rec.get("reason"):
        parts.append(rec["reason"])
    return "; ".join(parts) or "-"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_markdown(record: dict) -> str:
    """The short report: a table of sections, then every check/goal, skipped reason and failure tail."""
    env = record["env"]
    lines = [f"# memtrain gpu-check, {record['date']}", "",
             f"`{record['command']}` on {env.get('device_name')} (commit {env.get('commit')}, "
             f"dirty {env.get('dirty')})",
             "", "| section | status | s | summary |", "|---|---|---|---|"]
    for s in record["sections"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {_summary(s).replace('|', '/')} |")
    for s in record["sections"]:
        res = s.get("result") or {}
        rows = [f"- check {c['name']}: {'ok' if c['ok'] else 'FAILED'} (value {c.get('value')}, bound "
                f"{c.get('bound')})" for c in res.get("checks", [])]
        rows += [f"- goal {g['name']}: {'met' if g['met'] else 'not met'} (value {g.get('value')}, goal "
                 f"{g.get('goal')})" for g in res.get("goals", [])]
        rows += [f"- {f['name']}: {_fmt(f['value'])}" for f in res.get("figures", [])]
        if s["status"] == "failed" and s.get("stderr_tail"):
            rows.append("```\n" + s["stderr_tail"][-1200:] + "\n```")
        if rows:
            lines += ["", f"## {s['name']}: {s['title']}", *rows]
    skipped = [s for s in record["sections"] if s["status"] == "skipped"]
    if skipped:
        lines += ["", "## skipped", *[f"- {s['name']}: {s.get('reason')}" for s in skipped]]
    failed = [s["name"] for s in record["sections"] if s["status"] == "failed"]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'nothing failed'}**", ""]
    return "\n".join(lines)


def clear_extension_locks(root: pathlib.Path) -> list[str]:
    """Remove torch's extension-build locks under ``root`` (``<name>/lock``), whatever their age: called when
    the section that could hold one has ended (its process group is dead), so any lock left is stale."""
    from memtrain.kernels.dp_clip_once import clear_stale_lock

    cleared = []
    for lock in sorted(pathlib.Path(root).glob("*/lock")):
        if clear_stale_lock(lock.parent, max_age_s=0):
            cleared.append(str(lock))
    return cleared


def _environment(timeout_s: float) -> dict:
    """The record's ``env``, from a child (:func:`section_provenance`); what went wrong if it failed."""
    rec = run_section(Section("provenance", "memtrain.bench.gpu_check:section_provenance", PROVENANCE_ESTIMATE_S,
                              "the run's environment"), timeout_s)
    if rec["status"] == "ok":
        return rec["result"]["environment"]
    return {"device": "unknown", "error": f"{rec.get('reason')}: {rec.get('stderr_tail', '')[-500:]}"}


def run_gpu_check(out: pathlib.Path, timeout_scale: float = 1.0, only: list[str] | None = None,
                  sections: list[Section] | None = None, argv: list[str] | None = None, quick: bool = False) -> int:
    """Run the sections (all, those ``--quick`` runs, or those named in ``only``) within the run's budget,
    write the JSON and the report; 0 if none failed. This process never touches CUDA (see the module
    docstring); every section builds torch extensions in one directory of this run's, removed at the end."""
    import shutil
    import warnings

    from ._harness import command_line, utc_now

    t0 = time.perf_counter()
    budget = (QUICK_BUDGET_S if quick else BUDGET_S) * timeout_scale
    chosen = [s for s in (sections or SECTIONS) if (not only or s.name in only) and (not quick or s.quick)]
    head = {"command": command_line(argv), "argv": list(argv) if argv is not None else list(sys.argv[1:]),
            "date": utc_now(),
            "env": _environment(min(LIMIT_FACTOR * PROVENANCE_ESTIMATE_S * timeout_scale, budget))}
    ext_dir = tempfile.mkdtemp(prefix="memtrain-gpu-check-extensions-")
    base_env = {"TORCH_EXTENSIONS_DIR": ext_dir, QUICK_ENV: "1" if quick else "0"}
    recs, exports = [], {}
    try:
        for s in chosen:
            left = budget - (time.perf_counter() - t0)
            if left <= 1:
                rec = {"name": s.name, "title": s.title, "timeout_s": 0, "seconds": 0.0, "status": "skipped",
                       "reason": f"not started: the run's {budget:.0f} s budget was spent"}
            else:
                timeout = min(s.limit(quick) * timeout_scale, left)
                print(f"[gpu-check] {s.name}: {s.title} (timeout {timeout:.0f} s)", flush=True)
                rec = run_section(s, timeout, {**base_env, **exports})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    cleared = clear_extension_locks(pathlib.Path(ext_dir))
                if cleared:
                    rec["cleared_locks"] = cleared
            exports.update((rec.get("result") or {}).get("exports", {}))
            print(f"[gpu-check] {s.name}: {rec['status']} in {rec['seconds']:.1f} s"
                  + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
            recs.append(rec)
    finally:
        shutil.rmtree(ext_dir, ignore_errors=True)
    record = {"schema": SCHEMA, **head, "subcommand": "gpu-check",
              "config": {"timeout_scale": timeout_scale, "quick": quick, "budget_s": budget,
                         "planned_s": planned_seconds(chosen, quick), "sections": [s.name for s in chosen]},
              "sections": recs, "failed": [r["name"] for r in recs if r["status"] == "failed"],
              "skipped": {r["name"]: r.get("reason") for r in recs if r["status"] == "skipped"}}
    out.mkdir(parents=True, exist_ok=True)
    write_json("gpu_check", record, out / "gpu_check.json")
    text = report_markdown(record)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_check.md'}")
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: memtrain-bench gpu-check [--out DIR] [--quick] [--timeout-scale X] [--sections a,b]")
