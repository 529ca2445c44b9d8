"""Clipped sum of per-sample Linear gradients (memtrain.kernels.dp_clip_accumulate) against the non-DP GEMM.

    python -m memtrain.bench.kernels.bench_dp_clip_accumulate          # CUDA: Llama-7B layers, bf16 in, fp32 grad
    python -m memtrain.bench.kernels.bench_dp_clip_accumulate --shapes 4,64,256,256 --dtype float32 --rounds 3

Rows per layer shape (B, T, d_in, d_out): the non-DP weight gradient as autocast computes it (BLAS ``Gᵀ X``,
cuBLAS on CUDA, added into the gradient); the dispatcher (one BLAS GEMM of ``(c⊙G)ᵀ X`` with one scaled
operand, fp32 output for 16-bit inputs where torch offers it); on CUDA the Triton row-scaled GEMM (autotuned on
the first call). Interleaved rounds after a warm-up round;
median, p20 and p80. On CPU the defaults are small fp32 shapes and the Triton row is left out.
"""

from __future__ import annotations

import argparse

import torch

from memtrain.bench._harness import environment, interleaved, print_table, write_json
from memtrain.kernels import dp_clip_accumulate as A

LLAMA_7B = ["8,512,4096,4096", "8,512,4096,11008", "8,512,11008,4096", "8,512,4096,32000"]
CPU_SMALL = ["4,64,256,256", "4,64,256,688", "4,64,688,256", "4,64,256,4000"]


def methods(G: torch.Tensor, X: torch.Tensor, coef: torch.Tensor, gw: torch.Tensor, device: str) -> dict:
    B, T, d_out = G.shape
    g2, x2 = G.reshape(B * T, d_out), X.reshape(B * T, X.shape[2])

    def nondp():
        if gw.dtype == g2.dtype:
            gw.addmm_(g2.t(), x2)
        else:
            gw.add_(torch.mm(g2.t(), x2))

    out = {
        "BLAS G^T X (non-DP weight grad)": nondp,
        "dp_clip_accumulate_ (dispatcher: BLAS)": lambda: A.dp_clip_accumulate_(G, X, coef, gw),
    }
    if device.startswith("cuda"):
        out["Triton row-scaled GEMM (autotuned)"] = lambda: A._dp_clip_accumulate_triton(G, X, coef, gw, None,
                                                                                         "out_in")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,d_in,d_out (default: Llama-7B on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="G and X (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--grad-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shapes = args.shapes or (LLAMA_7B if cuda else CPU_SMALL)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    grad_dtype = getattr(torch, args.grad_dtype)
    rows, results = [], []
    for shape in shapes:
        B, T, d_in, d_out = map(int, shape.split(","))
        g = torch.Generator(device=args.device).manual_seed(0)
        G = torch.randn(B, T, d_out, device=args.device, generator=g).to(dtype)
        X = torch.randn(B, T, d_in, device=args.device, generator=g).to(dtype)
        coef = torch.rand(B, device=args.device, generator=g)
        gw = torch.zeros(d_out, d_in, device=args.device, dtype=grad_dtype)
        stats = interleaved(methods(G, X, coef, gw, args.device), args.rounds, args.warmup, args.device)
        gemm = stats["BLAS G^T X (non-DP weight grad)"]["median_s"]
        flops = 2 * B * T * d_in * d_out
        for name, s in stats.items():
            rows.append([shape, name, 1e3 * s["median_s"], 1e3 * s["p20_s"], 1e3 * s["p80_s"], s["median_s"] / gemm,
                         flops / s["median_s"] / 1e12])
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "stats": stats})
    print_table(f"dp_clip_accumulate_ on {args.device}: {dtype} inputs, {grad_dtype} gradient",
                ["B,T,in,out", "method", "median ms", "p20 ms", "p80 ms", "time / GEMM", "TFLOP/s"], rows)
    write_json(f"dp_clip_accumulate_{args.device.split(':')[0]}_{dtype}".replace("torch.", ""), {
        "benchmark": "dp_clip_accumulate", "config": {**vars(args), "shapes": shapes, "dtype": str(dtype)},
        "results": results, "environment": environment(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
