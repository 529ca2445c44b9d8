"""Shared set-up of the per-layer DP kernel benchmarks: shapes, command-line options, inputs, the timing loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from memtrain.bench._harness import interleaved, provenance, write_json

# (B, T, d_in, d_out) of Llama-7B's layers at B=8, T=512: attention projections, MLP up/gate, MLP down, LM head.
LLAMA_7B = ["8,512,4096,4096", "8,512,4096,11008", "8,512,11008,4096", "8,512,4096,32000"]
DTYPES = ["float32", "bfloat16", "float16"]


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,d_in,d_out (default: Llama-7B on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="G and X (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--rounds", "--reps", dest="rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    return ap


def resolve(args: argparse.Namespace, cpu_shapes: list[str]) -> tuple[list[str], torch.dtype]:
    """The shapes and input dtype: Llama-7B in bf16 on CUDA, ``cpu_shapes`` in fp32 on CPU, unless given."""
    cuda = args.device.startswith("cuda")
    return args.shapes or (LLAMA_7B if cuda else cpu_shapes), getattr(torch, args.dtype or (
        "bfloat16" if cuda else "float32"))


def time_layers(args: argparse.Namespace, shapes: list[str], dtype: torch.dtype,
                make_methods: Callable[..., dict]) -> list[tuple[str, tuple[int, ...], dict]]:
    """For each shape: seeded G (B, T, out) and X (B, T, in), then ``make_methods(G, X, generator)`` timed in
    interleaved rounds. Returns (shape, (B, T, d_in, d_out), stats) per shape."""
    timed = []
    for shape in shapes:
        B, T, d_in, d_out = map(int, shape.split(","))
        g = torch.Generator(device=args.device).manual_seed(0)
        G = torch.randn(B, T, d_out, device=args.device, generator=g).to(dtype)
        X = torch.randn(B, T, d_in, device=args.device, generator=g).to(dtype)
        stats = interleaved(make_methods(G, X, g), args.rounds, args.warmup, args.device)
        timed.append((shape, (B, T, d_in, d_out), stats))
    return timed


def save(benchmark: str, args: argparse.Namespace, shapes: list[str], dtype: torch.dtype, results: list) -> None:
    name = f"{benchmark}_{args.device.split(':')[0]}_{str(dtype).replace('torch.', '')}"
    write_json(name, {"benchmark": benchmark, **provenance(args.device),
                      "config": {**vars(args), "shapes": shapes, "dtype": str(dtype)}, "results": results}, args.out)
