"""``memtrain-bench`` (or ``python -m memtrain.bench``): zo2 and flashdp against their baselines.

    memtrain-bench zo --model opt-tiny                         # AdamW, SGD, MeZO, zo2 (+ offload) on CPU
    memtrain-bench zo --model opt-125m --methods zo2,zo2-offload,zo2-offload-amp   # + the offload ratio
    memtrain-bench dp --model llama-tiny --trainable linear    # non-DP, flashdp, Opacus, Opacus ghost
    memtrain-bench dp --model llama-6x512 --isolate            # + each method's peak in a fresh process
    memtrain-bench plan --model opt-13b,llama2-70b --batch 1 --seq 2048 --dtype bfloat16
    memtrain-bench plan --world-size 8 --shard fsdp --batch 8 --seq 2048 --dtype bfloat16   # per device, at scale
    memtrain-bench kernels zo_perturb --numel 1000000          # a kernel micro-benchmark (``kernels`` lists them)
    memtrain-bench gpu-check --out bench-runs/gpu-check        # the GPU verification (< 8 min on one H100/H200)
    memtrain-bench dp-audit                                    # one-run privacy audit: ε lower bound vs accountant
    memtrain-bench dp-audit --optimizer dpzo                   # the same audit of zo2.DPZOSGD
    memtrain-bench model-sweep --out bench/results/model-sweep  # zo2 and flashdp on every tiny causal LM

Methods run in one process, interleaved round by round (``--rounds``, 7 by default); times are the
median and p20/p80 of the round samples. Each run writes ``results.json`` (command, date, environment
with commit and dirty flag, config, one record per method with every sample and the memory plan beside
the measurement) and the plots into ``--out`` (default ``bench-runs/<command>-<time>``).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import pkgutil
import runpy
import sys

import torch

from . import dp_audit
from ._harness import print_table, provenance, write_json
from .catalogue import COMMANDS, METHODS, TOOLS
from .plan_scale import OPTIMIZER_STATE_BYTES, SCALE_MODELS, SHARDS, scale_plans
from .planner import DTYPE_BYTES, PlanInput, model_shape
from .presets import PRESETS
from .report import (
    breakdown,
    make_plots,
    plot_timeline,
    print_breakdowns,
    print_dp,
    print_isolated,
    print_offload,
    print_op_profiles,
    print_plans,
    print_results,
)

SCHEMA = "memtrain-bench/2"
KERNELS = "memtrain.bench.kernels"


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class _HelpParser(argparse.ArgumentParser):
    """A subcommand's parser whose --help shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _common(p: argparse.ArgumentParser, kind: str | None) -> None:
    p.add_argument("--model", "--preset", default="opt-tiny", type=_csv,
                   help=f"comma-separated presets ({', '.join(PRESETS)}) or local checkpoint folders")
    choices = sorted(COMMANDS[kind][0]) if kind else sorted(METHODS)
    default = ",".join(COMMANDS[kind][1]) if kind else ",".join(COMMANDS["zo"][1] + COMMANDS["dp"][1])
    p.add_argument("--methods", default=default, type=_csv, help=f"comma-separated, from {', '.join(choices)}")
    p.add_argument("--batch", type=_positive, default=4, help="sequences per step")
    p.add_argument("--seq", type=_positive, default=128, help="tokens per sequence")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's parameter dtype")
    p.add_argument("--trainable", default="all", choices=["all", "linear"],
                   help="'linear': only nn.Linear layers train (what Opacus can clip on every model)")
    p.add_argument("--out", default=None, help="output folder (None: bench-runs/<command>-<time>)")


def kernel_scripts() -> list[str]:
    """The kernel micro-benchmarks in memtrain.bench.kernels, by short name (``bench_zo_perturb`` -> zo_perturb)."""
    import importlib

    package = importlib.import_module(KERNELS)
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(package.__path__)
                  if m.name.startswith("bench_"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="memtrain-bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="also: memtrain-bench model-sweep (zo2 and flashdp on every causal LM that "
                                        "transformers builds tiny; model-sweep --help for its options)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_HelpParser, metavar="COMMAND",
                            help="one of the subcommands below; COMMAND --help for its options")
    for kind, text in (("zo", "zeroth-order: AdamW/SGD anchors, textbook MeZO, zo2 (plain, offload, offload+AMP)"),
                       ("dp", "private training: non-DP, flashdp, Opacus hooks, Opacus ghost clipping")):
        p = sub.add_parser(kind, help=text, description=text)
        _common(p, kind)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the methods run (cuda when there is one)")
        p.add_argument("--rounds", type=_positive, default=7,
                       help="rounds of the method sequence (A B C, C B A, ...), one sample per method and round; "
                            "keep >= 7 for ratio claims")
        p.add_argument("--steps", type=_positive, default=1, help="timed steps per method and round")
        p.add_argument("--warmup", type=int, default=1, help="untimed steps before them, each round")
        p.add_argument("--isolate", action="store_true",
                       help="also measure each method's peak memory in a fresh process of its own")
        p.add_argument("--profile-memory", action="store_true",
                       help="GPU: a memory snapshot per method; CPU: an RSS timeline (both with a breakdown)")
        p.add_argument("--profile-ops", type=int, default=0, metavar="N",
                       help="once per round, after all measured rounds, N untimed steps under torch.profiler: each "
                            "op's time and flashdp's regions (norms, clipped sums, noise, ...) per step")
        p.add_argument("--no-prime", dest="prime", action="store_false",
                       help="CPU: skip the priming run on a tiny model before each method's baseline")
        p.add_argument("--no-plots", dest="plots", action="store_false",
                       help="skip the PNG plots (peak memory, throughput)")
        if kind == "zo":
            p.add_argument("--prefetch", type=int, default=1,
                           help="offload: blocks uploaded ahead of the computing one (ring slots = prefetch + 1)")
    p = sub.add_parser("plan", help=TOOLS["plan"])
    _common(p, None)
    p.set_defaults(model=None)
    p.add_argument("--world-size", type=_positive, default=1, help="ranks (devices); --batch is the global batch")
    p.add_argument("--shard", default="none", choices=SHARDS,
                   help="none: one device, every method; ddp / fsdp: flashdp and zo2 under DDP or FSDP2, and zo2 "
                        "offload, per device (default models: " + ", ".join(SCALE_MODELS) + ")")
    p.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZER_STATE_BYTES),
                   help="flashdp's inner optimizer, for its state (--shard ddp/fsdp)")
    p = sub.add_parser("kernels", help=TOOLS["kernels"],
                       description="Kernel micro-benchmarks (memtrain.bench.kernels); without NAME, list them.")
    p.add_argument("script", nargs="?", help="e.g. zo_perturb (python -m memtrain.bench.kernels.bench_zo_perturb)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (NAME --help for its options)")
    _gpu_check_parser(sub)
    dp_audit.add_parser(sub)
    for action in sub._choices_actions:  # a subcommand's --help opens with its one-line summary
        parser = sub.choices[action.dest]
        parser.description = parser.description or action.help
    args = ap.parse_args(argv)
    if args.command == "dp-audit":
        problems = dp_audit.check_args(args)
        if problems:
            ap.error("; ".join(problems))
        return args
    if args.command == "gpu-check":
        from .gpu_check import SECTIONS

        unknown = [s for s in args.sections or [] if s not in {x.name for x in SECTIONS}]
        if unknown:
            ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(x.name for x in SECTIONS)}")
        if args.timeout_scale <= 0:
            ap.error(f"--timeout-scale must be > 0, got {args.timeout_scale}")
        return args
    if args.command == "kernels":
        if args.script is not None and args.script.removeprefix("bench_") not in kernel_scripts():
            ap.error(f"unknown kernel benchmark {args.script!r}; choose from {', '.join(kernel_scripts())}")
        return args
    if args.command == "plan":
        if args.shard == "none" and args.world_size > 1:
            ap.error("--world-size > 1 needs --shard ddp or --shard fsdp")
        args.model = args.model or (SCALE_MODELS if args.shard != "none" else ["opt-tiny"])
    known = COMMANDS[args.command][0] if args.command in COMMANDS else METHODS
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if getattr(args, "warmup", 0) < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if getattr(args, "profile_ops", 0) < 0:
        ap.error(f"--profile-ops must be >= 0, got {args.profile_ops}")
    if getattr(args, "prefetch", 0) < 0:
        ap.error(f"--prefetch must be >= 0, got {args.prefetch}")
    return args


def _gpu_check_parser(sub) -> None:
    p = sub.add_parser("gpu-check", help=TOOLS["gpu-check"], description=TOOLS["gpu-check"] + ". Without CUDA, "
                       "the sections that can run do, and the report says why the others were skipped.")
    p.add_argument("--out", default=None, help="output folder (default bench-runs/gpu-check-<time>)")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every section's timeout and the run's budget (cold-cache estimates sum to at most "
                        "8 minutes; no section runs past 10)")
    p.add_argument("--quick", action="store_true",
                   help="correctness only (CUDA build, GPU tests, DP kernels at the grid-limit shape) in 4 minutes")
    p.add_argument("--sections", type=_csv, default=None, help="comma-separated subset (default: all)")


def _plan_input(args: argparse.Namespace, model: str, device: str = "cuda") -> PlanInput:
    return PlanInput(model_shape(model, args.trainable), args.batch, args.seq, getattr(torch, args.dtype), device,
                     ring_slots=getattr(args, "prefetch", 1) + 1)


def _out_dir(args: argparse.Namespace) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out or f"bench-runs/{args.command}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_plan(args: argparse.Namespace) -> dict:
    if args.shard != "none":
        plans = []
        for model in args.model:
            inp = _plan_input(args, model)
            plans += [{"model": model, "world_size": args.world_size, "shard": args.shard,
                       **p.as_json()} for p in scale_plans(inp, args.world_size, args.shard, args.optimizer)]
        print_breakdowns(f"per-device memory, {args.shard} over {args.world_size} rank(s), global batch "
                         f"{args.batch}, T={args.seq}, {args.dtype} (formulas: docs/memory_plan.md)", plans)
        return {"plans": plans}
    plans = []
    for model in args.model:
        inp = _plan_input(args, model)
        plans += [_per_param({"model": model, **METHODS[m].plan_for(inp).as_json()}, inp.shape.params)
                  for m in args.methods]
    print_plans(plans)
    return {"plans": plans}


def _per_param(plan: dict, n_params: int) -> dict:
    """A plan record with the model's parameter count and its device (and host) bytes per parameter."""
    plan = {**plan, "n_params": n_params, "device_bytes_per_param": plan["total_bytes"] / n_params}
    if "host_bytes" in plan:
        plan["host_bytes_per_param"] = plan["host_bytes"]["total"] / n_params
    return plan


def _attach_plan(rec: dict, args: argparse.Namespace, model: str) -> None:
    shape = model_shape(model, args.trainable)
    rec["model"], rec["n_params"], rec["n_trainable"] = model, shape.params, shape.trainable
    rec["plan"] = METHODS[rec["method"]].plan_for(_plan_input(args, model, args.device)).as_json()
    if rec["status"] == "ok":
        peak = rec["memory_bytes"]["peak"]
        rec["plan_error"] = (rec["plan"]["total_bytes"] - peak) / peak if peak else None
        rec["breakdown"] = breakdown(rec, rec["plan"])


def run_measure(args: argparse.Namespace, out: pathlib.Path) -> dict:
    from .dp_ratio import dp_comparisons
    from .isolate import run_isolated
    from .memory import RssTimeline
    from .offload_ratio import offload_comparisons
    from .run import RunConfig, run_comparison

    methods = {m: METHODS[m] for m in args.methods}
    options = {"prefetch": args.prefetch} if args.command == "zo" else {}
    cpu_profile = args.profile_memory and not args.device.startswith("cuda")
    timeline = RssTimeline() if cpu_profile else None
    results = []
    if timeline:
        timeline.__enter__()
    try:
        for model in args.model:
            cfg = RunConfig(model=model, batch=args.batch, seq=args.seq, dtype=getattr(torch, args.dtype),
                            device=args.device, steps=args.steps, warmup=args.warmup, trainable=args.trainable,
                            rounds=args.rounds, profile_memory=args.profile_memory, snapshot_dir=str(out),
                            prime=args.prime, profile_ops=args.profile_ops, options=options)
            for rec in run_comparison(methods, cfg, timeline):
                _attach_plan(rec, args, model)
                results.append(rec)
            if args.isolate:
                one = RunConfig(**{**vars(cfg), "rounds": 1, "prime": False, "profile_memory": False,
                                   "profile_ops": 0})
                for rec in results[-len(methods):]:
                    rec["isolated"] = run_isolated(rec["method"], one)
    finally:
        if timeline:
            timeline.__exit__(None, None, None)
    memory = "GPU allocated" if args.device.startswith("cuda") else "process RSS"
    title = (f"{args.command}: B={args.batch}, T={args.seq}, {args.dtype}, {args.device}, trainable={args.trainable}, "
             f"{args.rounds} interleaved round(s) of {args.warmup} warm-up + {args.steps} timed step(s); step time "
             f"over the rounds; memory = peak increase ({memory}) over the pre-build baseline")
    print_results(title, results)
    print_isolated(results)
    record: dict = {"results": results}
    if args.command == "zo":
        record["comparisons"] = offload_comparisons(results, args.device)
        print_offload(record["comparisons"])
    else:
        record["comparisons"] = dp_comparisons(results)
        print_dp(record["comparisons"])
        print_op_profiles(record["comparisons"])
    if args.plots:
        record["plots"] = make_plots(results, out, memory)
    if timeline:
        record["rss_timeline"] = timeline.as_json()
        path = plot_timeline(record["rss_timeline"], out) if args.plots else None
        if path:
            record.setdefault("plots", []).append(path)
    return record


def run_kernels(args: argparse.Namespace) -> None:
    """List the kernel micro-benchmarks, or run one as ``python -m memtrain.bench.kernels.bench_<name>`` would."""
    if args.script is None:
        print("kernel micro-benchmarks (memtrain-bench kernels NAME [ARGS ...]):")
        for name in kernel_scripts():
            print(f"  {name}")
        return
    module = f"{KERNELS}.bench_{args.script.removeprefix('bench_')}"
    saved = sys.argv
    sys.argv = [module, *args.args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


def run_dp_audit(args: argparse.Namespace, argv: list[str] | None, planted: str | None = None) -> dict:
    """Audit one run, print the lower bound beside the accountant's ε, write ``results.json`` into ``--out``.

    ``planted`` names a noise bug a self-test planted (``bench/dp_audit_planted.py``); the record carries it."""
    head = provenance("cpu", argv)
    result = dp_audit.run_audit(args)
    print(result)
    print_table("dp-audit", ["ε lower bound", "accountant ε", "confidence", "δ", "m", "k+", "k-", "correct"],
                [[result.epsilon_lower_bound, result.accountant_epsilon, result.confidence, result.delta,
                  result.canaries, result.k_plus, result.k_minus, result.correct]])
    config = {k: v for k, v in vars(args).items() if k not in ("out", "command")}
    record = {"schema": SCHEMA, **head, "subcommand": "dp-audit", "config": config, "planted_bug": planted,
              "audit": result.as_json()}
    write_json("results", record, _out_dir(args) / "results.json")
    return record


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``memtrain-bench``); returns None so that the exit status is 0 (gpu-check exits 1
    when a section failed)."""
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["model-sweep"]:
        from .model_sweep import main as sweep_main

        sweep_main(raw[1:])
        return
    args = parse_args(argv)
    if args.command == "kernels":
        run_kernels(args)
        return
    if args.command == "dp-audit":
        run_dp_audit(args, argv)
        return
    if args.command == "gpu-check":
        from .gpu_check import run_gpu_check

        code = run_gpu_check(_out_dir(args), args.timeout_scale, args.sections, argv=argv, quick=args.quick)
        if code:
            sys.exit(code)  # a section failed: the report says which
        return
    compares = args.command in ("zo", "dp")  # both set methods side by side and print their ratios
    head = provenance(getattr(args, "device", "cpu"), argv, rounds=args.rounds if compares else None)
    out = _out_dir(args)
    body = run_plan(args) if args.command == "plan" else run_measure(args, out)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "command")}
    config["dtype_bytes"] = DTYPE_BYTES[getattr(torch, args.dtype)]
    write_json("results", {"schema": SCHEMA, **head, "subcommand": args.command, "config": config, **body},
               out / "results.json")
    for p in body.get("plots", []):
        print(f"wrote {p}")
