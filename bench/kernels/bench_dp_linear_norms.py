"""Per-sample gradient norms of a Linear layer (memtrain.kernels.dp_linear_norms) against the non-DP weight GEMM.

    python -m memtrain.bench.kernels.bench_dp_linear_norms             # CUDA: Llama-7B layers, bf16, B=8, T=512
    python -m memtrain.bench.kernels.bench_dp_linear_norms --shapes 4,64,256,256 --dtype float32 --rounds 3

Rows per layer shape (B, T, d_in, d_out): the BLAS ``Gᵀ X`` (cuBLAS on CUDA), the weight gradient of non-DP
training and the cost the norms are measured against; the dispatcher's choice; the ghost form on BLAS Grams;
the direct form as per-sample BLAS products; on CUDA the Triton kernels (direct, autotuned on the first call;
ghost). Interleaved rounds after a warm-up round (which also runs the autotuner); median, p20 and p80. On CPU the
defaults are small fp32 shapes and the Triton rows are left out (the interpreter measures nothing useful).
"""

from __future__ import annotations

import argparse

import torch

from memtrain.bench._harness import environment, interleaved, print_table, write_json
from memtrain.kernels import dp_linear_norms as N

LLAMA_7B = ["8,512,4096,4096", "8,512,4096,11008", "8,512,11008,4096", "8,512,4096,32000"]
CPU_SMALL = ["4,64,256,256", "4,64,256,688", "4,64,688,256", "4,64,256,4000"]


def methods(G: torch.Tensor, X: torch.Tensor, device: str) -> dict:
    B, T, d_out = G.shape
    g2, x2 = G.reshape(B * T, d_out), X.reshape(B * T, X.shape[2])
    out = {
        "BLAS G^T X (non-DP weight grad)": lambda: torch.mm(g2.t(), x2),
        "dp_linear_norms (dispatcher)": lambda: N.dp_linear_norms(G, X),
        "ghost: BLAS Grams": lambda: N._dp_linear_norms_torch(G, X, False, "ghost"),
        "direct: per-sample BLAS": lambda: N._dp_linear_norms_torch(G, X, False, "direct"),
    }
    if device.startswith("cuda"):
        out["direct: Triton (autotuned)"] = lambda: N._dp_linear_norms_triton(G, X, False, "direct")
        out["ghost: Triton"] = lambda: N._dp_linear_norms_triton(G, X, False, "ghost")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,d_in,d_out (default: Llama-7B on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shapes = args.shapes or (LLAMA_7B if cuda else CPU_SMALL)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    rows, results = [], []
    for shape in shapes:
        B, T, d_in, d_out = map(int, shape.split(","))
        g = torch.Generator(device=args.device).manual_seed(0)
        G = torch.randn(B, T, d_out, device=args.device, generator=g).to(dtype)
        X = torch.randn(B, T, d_in, device=args.device, generator=g).to(dtype)
        stats = interleaved(methods(G, X, args.device), args.rounds, args.warmup, args.device)
        gemm = stats["BLAS G^T X (non-DP weight grad)"]["median_s"]
        for name, s in stats.items():
            rows.append([shape, name, 1e3 * s["median_s"], 1e3 * s["p20_s"], 1e3 * s["p80_s"], s["median_s"] / gemm])
        auto = "ghost" if N.ghost_is_cheaper(T, d_in, d_out) else "direct"
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "dispatcher_method": auto, "stats": stats})
    print_table(f"dp_linear_norms on {args.device}, {dtype} (time / GEMM: the norms' cost in non-DP weight GEMMs)",
                ["B,T,in,out", "method", "median ms", "p20 ms", "p80 ms", "time / GEMM"], rows)
    write_json(f"dp_linear_norms_{args.device.split(':')[0]}_{dtype}".replace("torch.", ""), {
        "benchmark": "dp_linear_norms", "config": {**vars(args), "shapes": shapes, "dtype": str(dtype)},
        "results": results, "environment": environment(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
