"""Per-sample gradient norms of a Linear layer (memtrain.kernels.dp_linear_norms) against the non-DP weight GEMM.

    python -m memtrain.bench.kernels.bench_dp_linear_norms             # CUDA: Llama-7B layers, bf16, B=8, T=512
    python -m memtrain.bench.kernels.bench_dp_linear_norms --shapes 4,64,256,256 --dtype float32 --rounds 3

Rows per layer shape (B, T, d_in, d_out): the BLAS ``Gᵀ X`` (cuBLAS on CUDA), the weight gradient of non-DP
training and the cost the norms are measured against; the dispatcher's choice; the ghost form on BLAS Grams
(block lower triangles, as the library computes them) and, for comparison, on one full ``bmm`` per Gram; the
direct form as per-sample BLAS products; on CUDA the Triton kernels (direct, autotuned on the first call;
ghost). Interleaved rounds after a warm-up round (which also runs the autotuner); median, p20 and p80. On CPU
the defaults are small fp32 shapes and the Triton rows are left out (the interpreter measures nothing useful).
"""

from __future__ import annotations

import torch

from memtrain.bench._harness import print_table
from memtrain.bench.kernels._layers import parser, resolve, save, time_layers
from memtrain.kernels import dp_linear_norms as N

CPU_SMALL = ["4,64,256,256", "4,64,256,688", "4,64,688,256", "4,64,256,4000"]
GEMM = "BLAS G^T X (non-DP weight grad)"


def _ghost_full_grams(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """⟨G_b G_bᵀ, X_b X_bᵀ⟩ with each Gram one whole ``bmm`` (what the block triangle replaces)."""
    gg = N._bmm_fp32(G, G.transpose(1, 2))
    return gg.mul_(N._bmm_fp32(X, X.transpose(1, 2))).sum((1, 2))


def methods(G: torch.Tensor, X: torch.Tensor, cuda: bool) -> dict:
    B, T, d_out = G.shape
    g2, x2 = G.reshape(B * T, d_out), X.reshape(B * T, X.shape[2])
    out = {
        GEMM: lambda: torch.mm(g2.t(), x2),
        "dp_linear_norms (dispatcher)": lambda: N.dp_linear_norms(G, X),
        "ghost: BLAS Grams": lambda: N._dp_linear_norms_torch(G, X, False, "ghost"),
        "ghost: full-Gram bmm": lambda: _ghost_full_grams(G, X),
        "direct: per-sample BLAS": lambda: N._dp_linear_norms_torch(G, X, False, "direct"),
    }
    if cuda:
        out["direct: Triton (autotuned)"] = lambda: N._dp_linear_norms_triton(G, X, False, "direct")
        out["ghost: Triton"] = lambda: N._dp_linear_norms_triton(G, X, False, "ghost")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    shapes, dtype = resolve(args, CPU_SMALL)
    cuda = args.device.startswith("cuda")
    rows, results = [], []
    for shape, (B, T, d_in, d_out), stats in time_layers(args, shapes, dtype, lambda G, X, g: methods(G, X, cuda)):
        gemm = stats[GEMM]["median"]
        for name, s in stats.items():
            rows.append([shape, name, 1e3 * s["median"], 1e3 * s["p20"], 1e3 * s["p80"], s["median"] / gemm])
        auto = "ghost" if N.ghost_is_cheaper(T, d_in, d_out) else "direct"
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "dispatcher_method": auto, "stats": stats})
    print_table(f"dp_linear_norms on {args.device}, {dtype} (time / GEMM: the norms' cost in non-DP weight GEMMs)",
                ["B,T,in,out", "method", "median ms", "p20 ms", "p80 ms", "time / GEMM"], rows)
    save("dp_linear_norms", args, shapes, dtype, results)


if __name__ == "__main__":
    main()
