"""Per-layer microbenchmark of the DP Linear backward paths against the non-DP weight GEMM (CPU or CUDA).

    python bench/kernels/bench_dp_clip_once.py                      # the Llama-512 preset's layer shapes
    python bench/kernels/bench_dp_clip_once.py --shapes 32,128,512,512 --out bench/results/flashdp_kernels_cpu.json

For each (B, T, d_in, d_out): time of ``Gᵀ X`` (non-DP dW), and of each DP path (norms + factors + clipped sum):
``once`` (per-sample tiles in cache-sized chunks), ``ghost`` (Gram norms + row-scaled GEMM), ``direct``
(per-sample norms + row-scaled GEMM). Median of ``--reps`` after a warm-up (torch.utils.benchmark on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.utils.benchmark as tb

from memtrain.kernels.dp_clip_accumulate import clip_factors, dp_clip_accumulate_
from memtrain.kernels.dp_clip_once import dp_clip_once_
from memtrain.kernels.dp_linear_norms import dp_linear_norms

DEFAULT = ["32,128,512,512", "32,128,512,1376", "32,128,1376,512", "32,128,512,32000", "32,128,32000,512"]


def _time(fn, reps: int) -> float:
    t = tb.Timer(stmt="fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=0.2).median if reps <= 0 else t.timeit(reps).median


def bench(B: int, T: int, d_in: int, d_out: int, reps: int, device: str, dtype: torch.dtype) -> dict:
    G = torch.randn(B, T, d_out, device=device, dtype=dtype)
    X = torch.randn(B, T, d_in, device=device, dtype=dtype)
    gw = torch.zeros(d_out, d_in, device=device, dtype=dtype)
    gb = torch.zeros(d_out, device=device, dtype=dtype)
    g2, x2 = G.reshape(-1, d_out), X.reshape(-1, d_in)
    flops = 2 * B * T * d_in * d_out
    res = {"B": B, "T": T, "d_in": d_in, "d_out": d_out, "device": device, "dtype": str(dtype)}

    def nondp():
        gw.addmm_(g2.t(), x2)
        gb.add_(g2.sum(0))

    def once():
        dp_clip_once_(G, X, gw, gb, 1.0, float(B))

    def two_pass(method):
        def f():
            sq = dp_linear_norms(G, X, with_bias=True, method=method)
            dp_clip_accumulate_(G, X, clip_factors(sq, 1.0, float(B)), gw, gb)
        return f

    for name, fn in [("nondp", nondp), ("once", once), ("ghost", two_pass("ghost")), ("direct", two_pass("direct"))]:
        s = _time(fn, reps)
        res[f"{name}_ms"] = s * 1e3
        res[f"{name}_tflops"] = flops / s / 1e12
    for name in ("once", "ghost", "direct"):
        res[f"{name}_vs_nondp"] = res["nondp_ms"] / res[f"{name}_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT, help="B,T,d_in,d_out")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'B,T,in,out':<22}{'nondp ms':>10}{'once':>9}{'ghost':>9}{'direct':>9}   (ms; ratio = nondp/path)")
    for s in args.shapes:
        B, T, d_in, d_out = map(int, s.split(","))
        r = bench(B, T, d_in, d_out, args.reps, args.device, getattr(torch, args.dtype))
        rows.append(r)
        print(f"{s:<22}{r['nondp_ms']:>10.1f}" + "".join(
            f"{r[k + '_ms']:>7.1f}/{r[k + '_vs_nondp']:.2f}" for k in ("once", "ghost", "direct")), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
