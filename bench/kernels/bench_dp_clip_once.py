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

import torch

from memtrain.bench._harness import print_table
from memtrain.bench.kernels._layers import parser, resolve, save, time_layers
from memtrain.kernels import dp_clip_once as O
from memtrain.kernels.dp_clip_accumulate import clip_factors, dp_clip_accumulate_
from memtrain.kernels.dp_linear_norms import dp_linear_norms

CPU_DEFAULT = ["32,128,512,512", "32,128,512,1376", "32,128,1376,512", "32,128,512,32000", "32,128,32000,512"]


def methods(G: torch.Tensor, X: torch.Tensor, bias: bool) -> dict:
    B, _, d_out = G.shape
    d_in = X.shape[2]
    gw = torch.zeros(d_out, d_in, device=G.device)
    gb = torch.zeros(d_out, device=G.device) if bias else None
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
    ap = parser(__doc__)
    ap.add_argument("--no-bias", action="store_true", help="weight-only layers (what the CUDA kernel serves)")
    ap.set_defaults(rounds=5)
    args = ap.parse_args(argv)
    shapes, dtype = resolve(args, CPU_DEFAULT)
    cuda = args.device.startswith("cuda")
    if cuda:
        O.prepare(args.device)
    rows, results = [], []
    for shape, (B, T, d_in, d_out), stats in time_layers(args, shapes, dtype,
                                                         lambda G, X, g: methods(G, X, not args.no_bias)):
        base = stats["nondp"]["median"]
        served = cuda and O.cuda_once_fits(d_out, d_in, torch.device(args.device), dtype=dtype,
                                           has_bias=not args.no_bias)
        once_path = "cuda kernel" if served else "chunked BLAS"
        for name, s in stats.items():
            label = f"once ({once_path})" if name == "once" else name
            rows.append([shape, label, 1e3 * s["median"], 1e3 * s["p20"], 1e3 * s["p80"], base / s["median"]])
        results.append({"B": B, "T": T, "d_in": d_in, "d_out": d_out, "once_path": once_path, "stats": stats})
    print_table(f"DP Linear backward paths on {args.device}, {dtype} inputs (ratio = non-DP time / path time)",
                ["B,T,in,out", "path", "median ms", "p20 ms", "p80 ms", "nondp / path"], rows)
    if cuda:
        print(f"\ncooperative CUDA kernel: {O.cuda_once_status()}")
    save("dp_clip_once", args, shapes, dtype, results)


if __name__ == "__main__":
    main()
