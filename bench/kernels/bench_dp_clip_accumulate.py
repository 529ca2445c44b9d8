"""Clipped sum of per-sample Linear gradients (memtrain.kernels.dp_clip_accumulate) against the non-DP GEMM.

    python -m memtrain.bench.kernels.bench_dp_clip_accumulate          # CUDA: Llama-7B layers, bf16 in, fp32 grad
    python -m memtrain.bench.kernels.bench_dp_clip_accumulate --shapes 4,64,256,256 --dtype float32 --rounds 3

Rows per layer shape (B, T, d_in, d_out): the non-DP weight gradient as autocast computes it (BLAS ``Gᵀ X``,
cuBLAS on CUDA, added into the gradient); the dispatcher (one BLAS GEMM of ``(c⊙G)ᵀ X`` with one scaled
operand, fp32 output for 16-bit inputs where torch offers it); on CUDA the Triton row-scaled GEMM (autotuned on
the first call). Interleaved rounds after a warm-up round; median, p20 and p80. On CPU the defaults are small
fp32 shapes and the Triton row is left out.
"""

from __future__ import annotations

import torch

from memtrain.bench._harness import print_table
from memtrain.bench.kernels._layers import DTYPES, parser, resolve, save, time_layers
from memtrain.kernels import dp_clip_accumulate as A

CPU_SMALL = ["4,64,256,256", "4,64,256,688", "4,64,688,256", "4,64,256,4000"]
GEMM = "BLAS G^T X (non-DP weight grad)"


def methods(G: torch.Tensor, X: torch.Tensor, g: torch.Generator, grad_dtype: torch.dtype, cuda: bool) -> dict:
    B, T, d_out = G.shape
    d_in = X.shape[2]
    g2, x2 = G.reshape(B * T, d_out), X.reshape(B * T, d_in)
    coef = torch.rand(B, device=G.device, generator=g)
    gw = torch.zeros(d_out, d_in, device=G.device, dtype=grad_dtype)

    def nondp():
        if gw.dtype == g2.dtype:
            gw.addmm_(g2.t(), x2)
        else:
            gw.add_(torch.mm(g2.t(), x2))

    out = {GEMM: nondp, "dp_clip_accumulate_ (dispatcher: BLAS)": lambda: A.dp_clip_accumulate_(G, X, coef, gw)}
    if cuda:
        out["Triton row-scaled GEMM (autotuned)"] = lambda: A._dp_clip_accumulate_triton(G, X, coef, gw, None,
                                                                                         "out_in")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--grad-dtype", default="float32", choices=DTYPES)
    args = ap.parse_args(argv)
    shapes, dtype = resolve(args, CPU_SMALL)
    grad_dtype = getattr(torch, args.grad_dtype)
    cuda = args.device.startswith("cuda")
    rows, results = [], []
    timed = time_layers(args, shapes, dtype, lambda G, X, g: methods(G, X, g, grad_dtype, cuda))
    for shape, (B, T, d_in, d_out), stats in timed:
        gemm = stats[GEMM]["median"]
        flops = 2 * B * T * d_in * d_out
        for name, s in stats.items():
            rows.append([shape, name, 1e3 * s["median"], 1e3 * s["p20"], 1e3 * s["p80"], s["median"] / gemm,
                         flops / s["median"] / 1e12])
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "stats": stats})
    print_table(f"dp_clip_accumulate_ on {args.device}: {dtype} inputs, {grad_dtype} gradient",
                ["B,T,in,out", "method", "median ms", "p20 ms", "p80 ms", "time / GEMM", "TFLOP/s"], rows)
    save("dp_clip_accumulate", args, shapes, dtype, results)


if __name__ == "__main__":
    main()
