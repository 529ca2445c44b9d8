"""Per-layer microbenchmark of the DP Linear backward paths against the non-DP weight GEMM (CPU or CUDA).

    python -m memtrain.bench.kernels.bench_dp_clip_once          # CUDA: Llama-7B layers, bf16, B=8, T=512
    python -m memtrain.bench.kernels.bench_dp_clip_once          # CPU: the Llama-512 preset's layers, fp32
    python -m memtrain.bench.kernels.bench_dp_clip_once --shapes 32,128,512,512 --reps 3 \\
        --out bench/results/flashdp_kernels_cpu.json

For each (B, T, d_in, d_out): time of ``Gᵀ X`` (non-DP dW, BLAS: cuBLAS on CUDA), and of each DP path (norms +
factors + clipped sum): ``once`` (memtrain.kernels.dp_clip_once: per-sample tiles in cache-sized chunks, or on
CUDA the cooperative kernel for the fp32 bias-free layers it serves, built by prepare() first), ``ghost``
(Gram norms + row-scaled GEMM), ``direct`` (per-sample norms + row-scaled GEMM). Interleaved rounds after a
warm-up round; median, p20 and p80 (CUDA events on a GPU).
"""

from __future__ import annotations

import argparse

import torch

from memtrain.bench._harness import environment, interleaved, print_table, write_json
from memtrain.kernels import dp_clip_once as O
from memtrain.kernels.dp_clip_accumulate import clip_factors, dp_clip_accumulate_
from memtrain.kernels.dp_linear_norms import dp_linear_norms

CPU_DEFAULT = ["32,128,512,512", "32,128,512,1376", "32,128,1376,512", "32,128,512,32000", "32,128,32000,512"]
LLAMA_7B = ["8,512,4096,4096", "8,512,4096,11008", "8,512,11008,4096", "8,512,4096,32000"]


def methods(B: int, T: int, d_in: int, d_out: int, device: str, dtype: torch.dtype, bias: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    G = torch.randn(B, T, d_out, device=device, generator=g).to(dtype)
    X = torch.randn(B, T, d_in, device=device, generator=g).to(dtype)
    gw = torch.zeros(d_out, d_in, device=device)
    gb = torch.zeros(d_out, device=device) if bias else None
    g2, x2 = G.reshape(-1, d_out), X.reshape(-1, d_in)

    def nondp():
        gw.add_(torch.mm(g2.t(), x2).to(gw.dtype))
        if gb is not None:
            gb.add_(g2.sum(0, dtype=torch.float32))

    def two_pass(method):
        def f():
            sq = dp_linear_norms(G, X, with_bias=bias, method=method)
            dp_clip_accumulate_(G, X, clip_factors(sq, 1.0, float(B)), gw, gb)
        return f

    return {"nondp": nondp, "once": lambda: O.dp_clip_once_(G, X, gw, gb, 1.0, float(B)),
            "ghost": two_pass("ghost"), "direct": two_pass("direct")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,d_in,d_out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="G and X (default: bfloat16 on CUDA, float32 on CPU); gradients are fp32")
    ap.add_argument("--no-bias", action="store_true", help="weight-only layers (what the CUDA kernel serves)")
    ap.add_argument("--reps", "--rounds", dest="rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shapes = args.shapes or (LLAMA_7B if cuda else CPU_DEFAULT)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if cuda:
        O.prepare(args.device)
    rows, results = [], []
    for shape in shapes:
        B, T, d_in, d_out = map(int, shape.split(","))
        stats = interleaved(methods(B, T, d_in, d_out, args.device, dtype, not args.no_bias), args.rounds,
                            args.warmup, args.device)
        base = stats["nondp"]["median_s"]
        once_path = "cuda kernel" if cuda and O.cuda_once_fits(d_out, d_in, torch.device(args.device), dtype=dtype,
                                                               has_bias=not args.no_bias) else "chunked BLAS"
        for name, s in stats.items():
            label = f"once ({once_path})" if name == "once" else name
            rows.append([shape, label, 1e3 * s["median_s"], 1e3 * s["p20_s"], 1e3 * s["p80_s"], base / s["median_s"]])
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "once_path": once_path, "stats": stats})
    print_table(f"DP Linear backward paths on {args.device}, {dtype} inputs (ratio = non-DP time / path time)",
                ["B,T,in,out", "path", "median ms", "p20 ms", "p80 ms", "nondp / path"], rows)
    if cuda:
        print(f"\ncooperative CUDA kernel: {O.cuda_once_status()}")
    write_json(f"dp_clip_once_{args.device.split(':')[0]}_{dtype}".replace("torch.", ""), {
        "benchmark": "dp_clip_once", "config": {**vars(args), "shapes": shapes, "dtype": str(dtype)},
        "results": results, "environment": environment(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
