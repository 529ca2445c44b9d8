"""Noise kernel throughput: zo_perturb_ against torch.normal + add_ and against the memory floor.

Commands (figures in bench/RESULTS.md):
    python bench/kernels/bench_zo_perturb.py                 # CPU, 125 M fp32 elements (OPT-125m's size)
    python bench/kernels/bench_zo_perturb.py --device cuda --numel 1000000000 --dtype bfloat16

Rows: the fused kernel with one term (a perturbation), two terms (restore + update + next perturbation)
and Rademacher noise; AMP's host pass (with fp32 ``p``: the pending update of the fp32 master fused with
its cast into a bf16 staging copy, ``out=``; 10 bytes per element) and the cast alone; the textbook way
(torch.normal into a temporary, then add_); torch.randn alone; and a plain copy of the same bytes (the
memory floor: one read and one write of the tensor). Every row also gives elements per second per
thread (CPU) and its rate as a fraction of the copy's (``copy time / time``).

The AMP host pass, the step's bound on CPU (docs/zo2_offload.md):
    python -m memtrain.bench.kernels.bench_zo_perturb --numel 125000000 --rounds 7
On CUDA the Triton kernel's bandwidth is reported against a device-to-device copy.
"""

from __future__ import annotations

import argparse

import torch

from memtrain.bench._harness import interleaved, print_table, provenance, write_json
from memtrain.kernels.zo_perturb import zo_perturb_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=125_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    p = torch.zeros(args.numel, dtype=dtype, device=args.device)
    other = torch.empty_like(p)
    wire = torch.empty_like(p, dtype=torch.bfloat16)  # AMP's staging copy
    gen = torch.Generator(device=args.device).manual_seed(0)

    def textbook():
        p.add_(torch.normal(0.0, 1.0, size=p.shape, generator=gen, device=p.device, dtype=p.dtype), alpha=1e-3)

    methods = {
        "zo_perturb_ 1 term": lambda: zo_perturb_(p, [1], [1e-3], stream=0),
        "zo_perturb_ 2 terms + decay": lambda: zo_perturb_(p, [1, 2], [1e-3, -1e-3], stream=0, c=-1e-6),
        "zo_perturb_ rademacher": lambda: zo_perturb_(p, [1], [1e-3], stream=0, dist="rademacher"),
        "torch.normal + add_": textbook,
        **({"AMP host pass: update + cast (out=bf16)": lambda: zo_perturb_(p, [1], [-1e-3], stream=0, c=-1e-6,
                                                                          out=wire),
            "cast to bf16 alone": lambda: wire.copy_(p)} if dtype == torch.float32 else {}),
        "torch.randn (no update)": lambda: torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype),
        "copy (memory floor)": lambda: other.copy_(p),
    }
    stats = interleaved(methods, args.rounds, args.warmup, args.device)
    floor = stats["copy (memory floor)"]["median"]
    bytes_moved = 2 * p.numel() * p.element_size()
    rows = []
    threads = torch.get_num_threads() if args.device == "cpu" else None
    for name, s in stats.items():
        t = s["median"]
        per_thread = "-" if threads is None else f"{p.numel() / t / threads / 1e6:.0f}"
        rows.append([name, 1e3 * t, p.numel() / t / 1e6, per_thread, bytes_moved / t / 1e9, floor / t])
    print_table(f"{args.numel / 1e6:.0f} M {args.dtype} elements on {args.device} (threads: {threads or '-'})",
                ["method", "median ms", "M elem/s", "M elem/s/thread", "GB/s (copy's r+w)", "copy time / time"],
                rows)
    write_json(f"zo_perturb_{args.device.split(':')[0]}_{args.dtype}", {
        "benchmark": "zo_perturb", "config": vars(args),
        "results": {name: {**s, "elements_per_s": p.numel() / s["median"],
                           "elements_per_s_per_thread": p.numel() / s["median"] / threads if threads else None,
                           "fraction_of_copy_bandwidth": floor / s["median"]} for name, s in stats.items()},
        **provenance(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
