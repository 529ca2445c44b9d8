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
failed. Default timeouts sum to under 8 minutes; ``--timeout-scale`` multiplies them all.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ._harness import provenance, write_json

SCHEMA = "memtrain-bench/gpu-check/1"
TAIL_CHARS = 3000  # stderr kept from a failed section: its traceback's end


@dataclass(frozen=True)
class Section:
    """One section: its name, the ``module:function`` that runs it, and its default timeout."""

    name: str
    target: str
    timeout_s: float
    title: str


_K = "memtrain.bench.gpu_sections_kernels"
_Z = "memtrain.bench.gpu_sections_zo2"
SECTIONS: list[Section] = [
    Section("env", "memtrain.bench.gpu_check:section_env", 10, "environment report (python -m memtrain.env_report)"),
    Section("cuda_build", f"{_K}:section_cuda_build", 60,
            "build the cooperative dp_clip_once CUDA kernel once (torch's extension cache) for the sections after"),
    Section("gpu_tests", "memtrain.bench.gpu_check:section_gpu_tests", 80, "pytest -m gpu on the checkout's tests"),
    Section("dp_precision", f"{_K}:section_dp_precision", 55,
            "DP kernels on CUDA against float64: grid-limit and 2^31-offset shapes"),
    Section("dp_speed", f"{_K}:section_dp_speed", 50,
            "DP kernels against cuBLAS at Llama-7B shapes (bf16, B=8, T=512)"),
    Section("noise", f"{_K}:section_noise", 25, "Philox/zo_perturb noise: CPU vs GPU per dtype, fused pass bandwidth"),
    Section("zo2_offload", f"{_Z}:section_zo2_offload", 70,
            "zo2 offload vs plain ZOSGD, synthetic OPT 2048x8, prefetch 0/1/2 and AMP, with copy delays"),
    Section("opt_1_3b", f"{_Z}:section_opt_1_3b", 40, "OPT-1.3B step ratio offloaded / plain"),
    Section("opt_13b", f"{_Z}:section_opt_13b", 85, "OPT-13B offloaded step peak (B=1, T=2048, bf16 AMP)"),
]
BUDGET_S = 480  # the whole run on one GPU, at --timeout-scale 1


# ------------------------------------------------------------------------------------------- sections
def section_env() -> dict:
    """memtrain.env_report's content (versions, extension, kernel backends, flashdp dispatch)."""
    from memtrain.env_report import report

    return {"report": report()}


def section_gpu_tests() -> dict:
    """``pytest -m gpu`` on the checkout this code runs from (an installed wheel carries no tests)."""
    import torch

    from ._harness import own_checkout

    root = own_checkout()
    if root is None or not (root / "tests").is_dir():
        return {"status": "skipped", "reason": "no memtrain checkout with tests/ beside this installation "
                "(an installed wheel carries no tests): run from an editable install of the checkout"}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: every gpu-marked test would be skipped"}
    junit = pathlib.Path(tempfile.mkdtemp()) / "gpu.xml"
    # pytest's lines go to this section's stderr: if the section times out, its tail names the test that hung
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", "tests"], cwd=root, stdout=sys.stderr, stderr=subprocess.STDOUT)
    counts = _junit_counts(junit)
    ok = proc.returncode == 0 and counts.get("tests", 0) > 0
    summary = f"pytest exit {proc.returncode}, " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return {"status": "ok" if ok else "failed", "returncode": proc.returncode, **counts,
            "checks": [{"name": "pytest -m gpu passes", "ok": ok, "value": summary, "bound": "exit 0, >= 1 test"}]}


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


def run_gpu_check(out: pathlib.Path, timeout_scale: float = 1.0, only: list[str] | None = None,
                  sections: list[Section] | None = None, argv: list[str] | None = None) -> int:
    """Run the sections (all, or those named in ``only``), write the JSON and the report; 0 if none failed."""
    import torch

    chosen = [s for s in (sections or SECTIONS) if not only or s.name in only]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = provenance(device, argv)
    recs, exports = [], {}
    for s in chosen:
        print(f"[gpu-check] {s.name}: {s.title} (timeout {s.timeout_s * timeout_scale:.0f} s)", flush=True)
        rec = run_section(s, s.timeout_s * timeout_scale, exports)
        exports.update((rec.get("result") or {}).get("exports", {}))
        print(f"[gpu-check] {s.name}: {rec['status']} in {rec['seconds']:.1f} s"
              + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
        recs.append(rec)
    record = {"schema": SCHEMA, **head, "subcommand": "gpu-check", "config": {"timeout_scale": timeout_scale,
              "sections": [s.name for s in chosen]}, "sections": recs,
              "failed": [r["name"] for r in recs if r["status"] == "failed"],
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
        sys.exit("usage: memtrain-bench gpu-check [--out DIR] [--timeout-scale X] [--sections a,b]")
