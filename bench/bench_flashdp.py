"""End-to-end DP training throughput and peak memory (one process per method; ``python -m bench dp`` runs
the same methods in one process, with the memory plan): non-DP vs flashdp vs Opacus (hooks) vs Opacus ghost.

Commands (results in bench/RESULTS.md):

    # the issue's CPU preset: Llama, 6 layers, hidden 512, B=32, T=128, every parameter trainable
    python bench/bench_flashdp.py --trainable all --out bench/results/flashdp_cpu_llama_all.json
    # Opacus cannot clip Llama's RMSNorm: the like-for-like run trains only the Linear layers
    python bench/bench_flashdp.py --trainable linear --out bench/results/flashdp_cpu_llama_linear.json
    # quick check
    python bench/bench_flashdp.py --layers 2 --hidden 128 --vocab 1000 --batch 8 --seq 32 --steps 2

Each method runs in its own fresh subprocess (same seed, model, batch, SGD). Throughput is tokens/s over the
median of ``--steps`` timed steps after ``--warmup`` untimed ones; one step = forward, loss, backward,
optimizer step, zero_grad. Peak memory is the subprocess's peak resident set size (``ru_maxrss``): torch's CPU
allocator takes tensors straight from malloc, so RSS sees every tensor and temporary (tracemalloc sees none of
them), and a fresh process per method makes the peak belong to that method alone. We report it whole and
also minus the RSS after the model and batch were built (the training increment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.dp_methods import DP_METHODS
from bench.methods import Workload, freeze_all_but_linear

METHODS = ("nondp", "flashdp", "opacus", "opacus_ghost")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(args):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2 * args.seq, 256), attn_implementation="sdpa", tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    if args.trainable == "linear":
        freeze_all_but_linear(model)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    return model, ids


def _make_step(args, method: str):
    """Build a fresh model for ``method`` and return (step function, trainable parameters)."""
    model, ids = _build(args)
    workload = Workload(model, ids, "cpu", args.trainable)
    return DP_METHODS[method.replace("_", "-")].setup(workload).step, workload.params


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "interleaved":
        return _interleaved(args)
    method = args.worker
    step, params = _make_step(args, method)
    rss_setup = _rss_mb()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = _peak_rss_mb()
    return {"method": method, "step_s": times, "median_step_s": med, "tokens_per_s": args.batch * args.seq / med,
            "peak_rss_mb": peak, "rss_after_setup_mb": rss_setup, "train_increment_mb": peak - rss_setup,
            "trainable_params": sum(p.numel() for p in params)}


def _interleaved(args) -> dict:
    """Time every method in one process, one step each in turn (A B C D A B C D ...).

    On a shared machine the load changes over minutes; interleaving single steps exposes every method to
    the same load, so the throughput ratios are fair even when the absolute numbers drift.
    """
    methods = [m for m in args.methods.split(",") if not (m.startswith("opacus") and args.trainable == "all")]
    steps = {m: _make_step(args, m)[0] for m in methods}
    for _ in range(args.warmup):
        for m in methods:
            steps[m]()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.steps):
        for m in methods:
            t0 = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
    return {"times": times}


def _env() -> dict:
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    import opacus
    import transformers

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device_name": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "opacus": opacus.__version__,
            "git_sha": sha, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--interleave", action="store_true",
                    help="time all methods in one process, one step each in turn (fair on a shared machine); "
                         "peak memory still comes from one fresh process per method")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the methods this many times, interleaved (A B C A B C); keep each method's fastest run")
    ap.add_argument("--trainable", choices=("all", "linear"), default="all")
    ap.add_argument("--out", default=None, help="JSON output path (default: print only)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out", "methods")}
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in methods:
            if m.startswith("opacus") and args.trainable == "all":
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", m,
                   *(argv if argv is not None else sys.argv[1:])]
            if args.interleave:  # this run is for peak memory only: one step after the warm-up is enough
                cmd += ["--steps", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                runs[m].append({"method": m, "error": (proc.stderr or proc.stdout)[-2000:]})
                print(f"{m}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[m].append(json.loads(line[len("RESULT "):]))
            r = runs[m][-1]
            print(f"[{rep}] {m}: {r['tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
    if args.interleave:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "interleaved",
               *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"interleaved timing failed:\n{proc.stderr[-3000:]}")
        inter = json.loads(line[len("RESULT "):])["times"]
        for m, ts in inter.items():
            for r in runs[m]:
                if "tokens_per_s" in r:
                    r["separate_process_tokens_per_s"] = r["tokens_per_s"]
                    r["step_s"] = ts
                    r["median_step_s"] = statistics.median(ts)
                    r["tokens_per_s"] = args.batch * args.seq / r["median_step_s"]
                    r["timing"] = "interleaved"
            print(f"interleaved {m}: {args.batch * args.seq / statistics.median(ts):.1f} tok/s", flush=True)
    rows = []
    for m in methods:
        ok = [r for r in runs[m] if "tokens_per_s" in r]
        if m.startswith("opacus") and args.trainable == "all":
            rows.append({"method": m, "skipped": "Opacus cannot clip Llama's RMSNorm (run --trainable linear)"})
        elif not ok:
            rows.append(runs[m][-1] if runs[m] else {"method": m, "error": "not run"})
        else:
            best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
            best["all_runs_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
            best["all_runs_peak_rss_mb"] = [r["peak_rss_mb"] for r in ok]
            rows.append(best)

    base = next((r for r in rows if r.get("method") == "nondp" and "tokens_per_s" in r), None)
    print(f"\nLlama {args.layers}L h{args.hidden} V{args.vocab} B={args.batch} T={args.seq} trainable={args.trainable}")
    print(f"{'method':<14}{'tok/s':>10}{'vs non-DP':>11}{'peak RSS MiB':>14}{'vs non-DP':>11}{'incr MiB':>10}")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['method']:<14}  {r.get('skipped') or 'error'}")
            continue
        if base:
            r["throughput_vs_nondp"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["peak_rss_vs_nondp"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{r['method']:<14}{r['tokens_per_s']:>10.1f}{r.get('throughput_vs_nondp', float('nan')):>10.2f}x"
              f"{r['peak_rss_mb']:>14.0f}{r.get('peak_rss_vs_nondp', float('nan')):>10.2f}x"
              f"{r['train_increment_mb']:>10.0f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": _env(), "config": config, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
