"""``python -m bench`` / ``memtrain-bench``: throughput and memory of zo2 and flashdp against their baselines.

    python -m bench zo --model opt-tiny --steps 3            # AdamW, SGD, MeZO, zo2 (+ offload) on CPU
    python -m bench dp --model llama-tiny --trainable linear  # non-DP, flashdp, Opacus, Opacus ghost
    python -m bench plan --model opt-13b,llama2-70b --batch 1 --seq 2048 --dtype bfloat16
    python -m bench zo --model opt-1.3b --device cuda --dtype bfloat16 --profile-memory

Each run writes ``results.json`` (config, environment, per-method records with the plan beside the
measurement) and the plots into ``--out`` (default ``bench-runs/<command>-<time>``).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

from ._harness import environment, write_json
from .dp_methods import DEFAULT_DP, DP_METHODS
from .methods import Method
from .planner import DTYPE_BYTES, model_shape, plan_method
from .presets import PRESETS
from .report import breakdown, make_plots, plot_timeline, print_plans, print_results
from .zo_methods import DEFAULT_ZO, ZO_METHODS

SCHEMA = "memtrain-bench/1"
CATALOGUE = {"zo": (ZO_METHODS, DEFAULT_ZO), "dp": (DP_METHODS, DEFAULT_DP)}


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _common(p: argparse.ArgumentParser, kind: str | None) -> None:
    p.add_argument("--model", "--preset", default="opt-tiny", type=_csv,
                   help=f"comma-separated presets ({', '.join(PRESETS)}) or local checkpoint folders")
    choices = sorted(CATALOGUE[kind][0]) if kind else sorted({**ZO_METHODS, **DP_METHODS})
    default = ",".join(CATALOGUE[kind][1]) if kind else ",".join(DEFAULT_ZO + DEFAULT_DP)
    p.add_argument("--methods", default=default, type=_csv, help=f"comma-separated, from {', '.join(choices)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trainable", default="all", choices=["all", "linear"],
                   help="'linear': only nn.Linear layers train (what Opacus can clip on every model)")
    p.add_argument("--out", default=None, help="output folder (default bench-runs/<command>-<time>)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for kind, text in (("zo", "zeroth-order: AdamW/SGD anchors, textbook MeZO, zo2 (plain, offload, offload+AMP)"),
                       ("dp", "private training: non-DP, flashdp, Opacus hooks, Opacus ghost clipping")):
        p = sub.add_parser(kind, help=text, description=text)
        _common(p, kind)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
        p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
        p.add_argument("--rounds", type=int, default=1, help="repeat the method sequence (A B C A B C ...)")
        p.add_argument("--profile-memory", action="store_true",
                       help="GPU: a memory snapshot per method; CPU: an RSS timeline (both with a breakdown)")
        p.add_argument("--no-prime", dest="prime", action="store_false",
                       help="CPU: skip the priming run on a tiny model before each method's baseline")
        p.add_argument("--no-plots", dest="plots", action="store_false")
    p = sub.add_parser("plan", help="predicted peak memory per method, without running anything")
    _common(p, None)
    args = ap.parse_args(argv)
    known = CATALOGUE[args.command][0] if args.command in CATALOGUE else {**ZO_METHODS, **DP_METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return args


def _plan(method: str, model: str, args: argparse.Namespace) -> dict:
    return plan_method(method, model_shape(model, args.trainable), args.batch, args.seq,
                       getattr(torch, args.dtype)).as_json()


def _out_dir(args: argparse.Namespace) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out or f"bench-runs/{args.command}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_plan(args: argparse.Namespace) -> dict:
    plans = [{"model": m, **_plan(meth, m, args)} for m in args.model for meth in args.methods]
    print_plans(plans)
    return {"plans": plans}


def run_measure(args: argparse.Namespace, out: pathlib.Path) -> dict:
    from .memory import RssTimeline
    from .run import RunConfig, run_comparison

    methods: dict[str, Method] = {m: CATALOGUE[args.command][0][m] for m in args.methods}
    dtype = getattr(torch, args.dtype)
    cpu_profile = args.profile_memory and not args.device.startswith("cuda")
    timeline = RssTimeline() if cpu_profile else None
    results = []
    if timeline:
        timeline.__enter__()
    try:
        for model in args.model:
            cfg = RunConfig(model=model, batch=args.batch, seq=args.seq, dtype=dtype, device=args.device,
                            steps=args.steps, warmup=args.warmup, trainable=args.trainable, rounds=args.rounds,
                            profile_memory=args.profile_memory, snapshot_dir=str(out), prime=args.prime)
            shape = model_shape(model, args.trainable)
            for rec in run_comparison(methods, cfg, timeline):
                rec["model"], rec["n_params"], rec["n_trainable"] = model, shape.params, shape.trainable
                try:
                    rec["plan"] = plan_method(rec["method"], shape, args.batch, args.seq, dtype,
                                              device=args.device).as_json()
                except ValueError:
                    rec["plan"] = None
                if rec["status"] == "ok":
                    peak = rec["memory_bytes"]["peak"]
                    rec["plan_error"] = (rec["plan"]["total_bytes"] - peak) / peak if rec["plan"] and peak else None
                    rec["breakdown"] = breakdown(rec, rec["plan"])
                results.append(rec)
    finally:
        if timeline:
            timeline.__exit__(None, None, None)
    title = (f"{args.command}: B={args.batch}, T={args.seq}, {args.dtype}, {args.device}, trainable={args.trainable}, "
             f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} round(s); memory = peak increase "
             f"({'GPU allocated' if args.device.startswith('cuda') else 'process RSS'}) over the pre-build baseline")
    print_results(title, results)
    record: dict = {"results": results}
    if args.plots:
        record["plots"] = make_plots(results, out, "GPU allocated" if args.device.startswith("cuda") else "RSS")
    if timeline:
        record["rss_timeline"] = timeline.as_json()
        path = plot_timeline(record["rss_timeline"], out) if args.plots else None
        if path:
            record.setdefault("plots", []).append(path)
    return record


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``memtrain-bench``); returns None so that the exit status is 0."""
    args = parse_args(argv)
    out = _out_dir(args)
    device = getattr(args, "device", "cpu")
    body = run_plan(args) if args.command == "plan" else run_measure(args, out)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["dtype_bytes"] = DTYPE_BYTES[getattr(torch, args.dtype)]
    write_json("results", {"schema": SCHEMA, "command": args.command,
                           "argv": list(sys.argv[1:] if argv is None else argv), "config": config,
                           "environment": environment(device), **body}, str(out / "results.json"))
    for p in body.get("plots", []):
        print(f"wrote {p}")
