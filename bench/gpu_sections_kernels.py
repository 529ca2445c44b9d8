"""gpu-check sections on the kernels: DP precision against float64, DP speed against cuBLAS, noise.

Each ``section_*`` runs in its own interpreter (bench/gpu_check.py) and returns a JSON-ready dict.

Precision. Inputs are drawn once in the kernel's input dtype; the reference is computed in float64 from
those same values, sample by sample (ghost identity ``‖G_bᵀX_b‖² = Σ (G_bG_bᵀ) ⊙ (X_bX_bᵀ)``, exact in real
arithmetic), so the error measured is the kernel's alone. Norms: max over samples of |n - n_ref| / n_ref;
clipped sums: max |W - W_ref| / max |W_ref| (normwise: elementwise ratios explode near zero).

Bounds. An fp32 accumulation of K exact products (bf16·bf16 and, with ``input_precision="ieee"``,
fp32·fp32 are exact in fp32) has error about sqrt(K)·2^-24 per sum for random signs: with K ≤ 2^15 that is
≤ 1.1e-5, so the fp32 goal is 1e-4 (TF32 operands, a 10-bit mantissa, give ≈ 1e-3 and miss it). cuBLAS
may reduce split-K partials in bf16 (torch's default), up to a few bf16 ulps (2^-8 each), so no path may
exceed 1e-2: beyond that the kernel reads the wrong elements (an offset or grid bug), which is what the
checks catch.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from .kernels import _layers

CUDA_GRID_AXIS = 65535  # CUDA's limit on grid axes 1 and 2 (the old launchers put tiles there)
OLD_GHOST_TILE = 16  # the old ghost grid was (B, cdiv(T, 16)^2)
OLD_DIRECT_TILE = 32  # the old direct grid was (B, cdiv(d_out, 32) * cdiv(d_in, 32))
LLAMA3_VOCAB = 128256
ROUGH_BOUND = 1e-2  # correctness: beyond this a kernel reads the wrong elements (see the module docstring)
FP32_GOAL = 1e-4  # the fp32 promise (ieee dots), see the module docstring
PRECISION_CONFIGS = {  # fixed tiles: the autotuner would time ~10 configs on a 2^31 shape (seconds each)
    "direct": {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32, "num_warps": 4, "num_stages": 3},
    "accumulate": {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 3},
}


ONCE_ENV = "MEMTRAIN_GPU_CHECK_ONCE_KERNEL"  # set by section_cuda_build for the sections after it
ONCE_SHAPE = (8, 512, 512, 512)  # a layer the cooperative kernel serves (fp32, weight-only, few tiles)


def section_cuda_build() -> dict:
    """Build (or load from torch's extension cache) the cooperative dp_clip_once kernel, once for the run."""
    import time

    from memtrain.kernels import dp_clip_once as O

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "exports": {ONCE_ENV: "no CUDA device"}}
    t0 = time.perf_counter()
    ready = O.prepare("cuda")
    status = O.cuda_once_status()
    return {"ready": ready, "status_line": status, "seconds": time.perf_counter() - t0,
            "exports": {ONCE_ENV: "ready" if ready else status},
            "goals": [{"name": "cooperative kernel available", "met": ready, "value": status, "goal": "ready"}]}


def once_kernel_ready() -> bool:
    """Whether section_cuda_build made the kernel; then load it (from the cache) here. Never builds anew."""
    if os.environ.get(ONCE_ENV) != "ready":
        return False
    from memtrain.kernels import dp_clip_once as O

    return O.prepare("cuda")


def grid_limit_shape(d_in: int = 4096, d_out: int = 32000) -> tuple[int, int, int, int]:
    """(B, T, d_in, d_out): the smallest T at which the old ghost grid's axis 1, cdiv(T,16)^2, passes 65535
    (the old direct grid's axis 1, cdiv(d_out,32)·cdiv(d_in,32) = 128000, passes it at any T)."""
    n = math.isqrt(CUDA_GRID_AXIS) + 1  # smallest tile count whose square passes the limit
    return 1, (n - 1) * OLD_GHOST_TILE + 1, d_in, d_out


def offset_overflow_shape(d_in: int = 4096, vocab: int = LLAMA3_VOCAB, batch: int = 8) -> tuple[int, int, int, int]:
    """(B, T, d_in, d_out): the smallest T at this batch where B·T·V passes 2^31 (int32 element offsets)."""
    return batch, -(-2**31 // (batch * vocab)), d_in, vocab


def precision_need_bytes(B: int, T: int, d_in: int, d_out: int, itemsize: int) -> int:
    """Device bytes the precision check holds at once: G and X, one sample in float64, its two Grams, the
    fp32 gradient and its float64 reference, a per-sample fp32 gradient (torch direct path), 20% slack."""
    inputs = B * T * (d_in + d_out) * itemsize
    sample64 = T * (d_in + d_out) * 8 + 2 * T * T * 8
    grads = d_out * d_in * (4 + 8 + 4 + 8)  # kernel output, reference, per-sample temporary, reference addend
    return int(1.2 * (inputs + sample64 + grads))


def _reference(G: torch.Tensor, X: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 squared norms per sample, the fp32 clip factors the kernels are given (clip_factors of those
    norms, loss scale B), and the float64 clipped sum Σ_b coef_b G_bᵀX_b; one sample at a time."""
    from memtrain.kernels.dp_clip_accumulate import clip_factors

    B = G.shape[0]
    sq = torch.zeros(B, dtype=torch.float64, device=G.device)
    coef = torch.zeros(B, dtype=torch.float32, device=G.device)
    gw = torch.zeros(G.shape[2], X.shape[2], dtype=torch.float64, device=G.device)
    for b in range(B):
        g, x = G[b].double(), X[b].double()
        sq[b] = ((g @ g.T) * (x @ x.T)).sum()
        coef[b] = clip_factors(sq[b:b + 1].float(), max_norm, float(B))[0]
        gw.addmm_(g.T, x, alpha=float(coef[b]))
        del g, x
    return sq, coef, gw


def _rel_norms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def _rel_matrix(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _precision_at(shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict:
    """Every DP path at one shape and input dtype against the float64 reference."""
    from memtrain.kernels import dp_clip_accumulate as A
    from memtrain.kernels import dp_clip_once as O
    from memtrain.kernels import dp_linear_norms as N

    B, T, d_in, d_out = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(B, T, d_out, device="cuda", generator=g).to(dtype)
    X = torch.randn(B, T, d_in, device="cuda", generator=g).to(dtype)
    max_norm = 1.0
    with torch.no_grad():
        sq_ref, coef, gw_ref = _reference(G, X, max_norm)
    torch.cuda.empty_cache()
    norms = {
        "dp_linear_norms triton direct": lambda: N._dp_linear_norms_triton(G, X, False, "direct",
                                                                           PRECISION_CONFIGS["direct"]),
        "dp_linear_norms triton ghost": lambda: N._dp_linear_norms_triton(G, X, False, "ghost"),
        "dp_linear_norms torch ghost (cuBLAS Grams)": lambda: N._dp_linear_norms_torch(G, X, False, "ghost"),
        "dp_linear_norms torch direct (per-sample cuBLAS)": lambda: N._dp_linear_norms_torch(G, X, False, "direct"),
    }
    rows = {name: {"norms_rel": _rel_norms(fn(), sq_ref)} for name, fn in norms.items()}
    grads = {
        "dp_clip_accumulate_ (dispatcher: cuBLAS)": lambda w: A.dp_clip_accumulate_(G, X, coef, w),
        "dp_clip_accumulate triton": lambda w: A._dp_clip_accumulate_triton(G, X, coef, w, None, "out_in",
                                                                            config=PRECISION_CONFIGS["accumulate"]),
    }
    for name, fn in grads.items():
        w = torch.zeros(d_out, d_in, device="cuda")
        fn(w)
        rows[name] = {"clipped_sum_rel": _rel_matrix(w, gw_ref)}
        del w
    w = torch.zeros(d_out, d_in, device="cuda")
    sq = O.dp_clip_once_(G, X, w, None, max_norm, float(B))
    path = "cuda kernel" if O.cuda_once_fits(d_out, d_in, torch.device("cuda"), dtype=dtype) else "chunked cuBLAS"
    rows[f"dp_clip_once_ ({path})"] = {"norms_rel": _rel_norms(sq, sq_ref), "clipped_sum_rel": _rel_matrix(w, gw_ref)}
    return rows


def section_dp_precision() -> dict:
    """DP kernels on CUDA against float64 at the grid-limit shape and, memory allowing, the 2^31 shape."""
    shapes = {"grid limit": grid_limit_shape(), "2^31 offsets": offset_overflow_shape()}
    plan = {k: {"B,T,d_in,d_out": list(s), "B*T*d_out": s[0] * s[1] * s[3],
                "need_bytes_bf16": precision_need_bytes(*s, 2)} for k, s in shapes.items()}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "shapes": plan}
    out: dict = {"shapes": plan, "results": {}, "checks": [], "goals": [], "skipped_shapes": {}}
    cases = [("grid limit", torch.float32), ("grid limit", torch.bfloat16), ("2^31 offsets", torch.bfloat16)]
    if os.environ.get("MEMTRAIN_GPU_CHECK_QUICK") == "1":  # gpu_check.QUICK_ENV: --quick's budget
        cases.pop()
        out["skipped_shapes"]["2^31 offsets bfloat16"] = "--quick: the grid-limit shape only"
    if once_kernel_ready():  # the cooperative kernel's own precision, at a shape it serves
        shapes["once kernel"] = ONCE_SHAPE
        cases.insert(0, ("once kernel", torch.float32))
    else:
        out["skipped_shapes"]["once kernel"] = f"cooperative kernel not built: {os.environ.get(ONCE_ENV, 'not tried')}"
    for key, dtype in cases:
        shape = shapes[key]
        need = precision_need_bytes(*shape, dtype.itemsize)
        free, _ = torch.cuda.mem_get_info()
        label = f"{key} {str(dtype).removeprefix('torch.')}"
        if need > free:
            out["skipped_shapes"][label] = f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            continue
        rows = _precision_at(shape, dtype)
        out["results"][label] = rows
        torch.cuda.empty_cache()
        for path, errs in rows.items():
            for kind, err in errs.items():
                out["checks"].append({"name": f"{label}: {path} {kind}", "ok": err <= ROUGH_BOUND,
                                      "value": err, "bound": ROUGH_BOUND})
                if "triton" in path or "cuda kernel" in path:  # ieee dots: the fp32 promise
                    out["goals"].append({"name": f"{label}: {path} {kind}", "met": err <= FP32_GOAL,
                                         "value": err, "goal": FP32_GOAL})
    return out


def section_dp_speed() -> dict:
    """The DP kernel micro-benchmarks' methods (bench/kernels) at Llama-7B layer shapes, bf16, B=8, T=512:
    each path's median time over the cuBLAS weight GEMM's."""
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "shapes": _layers.LLAMA_7B}

    from .kernels import bench_dp_clip_accumulate as BA
    from .kernels import bench_dp_clip_once as BO
    from .kernels import bench_dp_linear_norms as BN

    once = once_kernel_ready()
    args = argparse.Namespace(device="cuda", rounds=3, warmup=1)
    benches = {
        "dp_linear_norms": (lambda G, X, g: BN.methods(G, X, True), BN.GEMM),
        "dp_clip_accumulate": (lambda G, X, g: BA.methods(G, X, g, torch.float32, True), BA.GEMM),
        "dp_clip_once": (lambda G, X, g: BO.methods(G, X, bias=False), "nondp"),
    }
    out: dict = {"shapes": _layers.LLAMA_7B, "dtype": "bfloat16", "once_kernel_ready": once, "results": {},
                 "figures": []}
    for bench, (make, base) in benches.items():
        for shape, _, stats in _layers.time_layers(args, _layers.LLAMA_7B, torch.bfloat16, make):
            ref = stats[base]["median"]
            out["results"][f"{bench} {shape}"] = {name: {"median_s": s["median"], "p20_s": s["p20"], "p80_s": s["p80"],
                                                         "time_over_cublas": s["median"] / ref}
                                                  for name, s in stats.items()}
            slowest = max((n for n in stats if n != base), key=lambda n: stats[n]["median"])
            out["figures"] += [{"name": f"{bench} {shape}: {n} / cuBLAS GEMM", "value": stats[n]["median"] / ref}
                               for n in stats if n != base and (n == slowest or "dispatch" in n or n == "once")]
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ noise
def _ulps32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp32 ulps (integer bit patterns; the values compared share their sign)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _cpu_self_check(n: int, seed: int, stream: int, offset: int) -> list[dict]:
    """The CPU backend (C++, or the torch fallback) against the torch twin of the Philox noise, bit for bit."""
    from memtrain._cpp import cpp_available
    from memtrain.kernels import philox as P

    checks = []
    for dist in ("normal", "rademacher"):
        got = P.philox_fill_(torch.empty(n), seed, stream, dist, offset)
        twin = P.noise_torch(n, seed, stream, P.dist_code(dist), offset, torch.device("cpu"))
        diff = int((got != twin).sum())
        backend = "C++" if cpp_available() else "torch fallback"
        checks.append({"name": f"cpu {dist} fp32: {backend} == torch twin", "ok": diff == 0,
                       "value": f"{diff} elements differ", "bound": "0"})
    return checks


def section_noise() -> dict:
    """CPU self-check; on CUDA: CPU vs GPU noise per dtype (fp32 ≤ 1 ulp; bf16: equal where the fp32 z agree,
    else ≤ 1 bf16 ulp) and the fused zo_perturb_ pass's time against a device-to-device copy."""
    from memtrain.kernels import philox as P
    from memtrain.kernels.zo_perturb import zo_perturb_

    from ._harness import interleaved

    n, seed, stream, offset = 2**22 + 3, 0xF23456789ABCDEF0, 2**40 + 11, 2**33 + 5
    out: dict = {"elements": n, "checks": _cpu_self_check(2**20 + 3, seed, stream, offset), "goals": []}
    if not torch.cuda.is_available():
        return {**out, "status": "skipped" if all(c["ok"] for c in out["checks"]) else "failed",
                "reason": "no CUDA device: only the CPU self-check ran"}
    for dist in ("normal", "rademacher"):
        cpu32 = P.philox_fill_(torch.empty(n), seed, stream, dist, offset)
        gpu32 = P.philox_fill_(torch.empty(n, device="cuda"), seed, stream, dist, offset).cpu()
        ulps = _ulps32(cpu32, gpu32)
        out["checks"].append({"name": f"{dist} fp32 CPU vs GPU (ulps)", "ok": int(ulps.max()) <= 1,
                              "value": int(ulps.max()), "bound": 1})
        cpu16 = P.philox_fill_(torch.empty(n, dtype=torch.bfloat16), seed, stream, dist, offset)
        gpu16 = P.philox_fill_(torch.empty(n, dtype=torch.bfloat16, device="cuda"), seed, stream, dist, offset).cpu()
        # each bf16 value is its fp32 z rounded once: equal where the fp32 z agree, else at most one bf16 ulp
        stray = int(((cpu16 != gpu16) & (ulps == 0)).sum())
        far = int(((cpu16.float() - gpu16.float()).abs() > torch.finfo(torch.bfloat16).eps * cpu16.float().abs()).sum())
        out["checks"].append({"name": f"{dist} bf16 CPU vs GPU (equal where fp32 agrees, else <= 1 bf16 ulp)",
                              "ok": stray == 0 and far == 0, "value": f"{stray} stray, {far} beyond 1 ulp",
                              "bound": "0 and 0"})
    theta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    coefs = [1e-3, -2e-3]
    cpu = zo_perturb_(theta.clone(), [7, 8], coefs, stream=3)
    gpu = zo_perturb_(theta.cuda(), [7, 8], coefs, stream=3).cpu()
    # z may differ by one fp32 ulp (|z| <= 5.77 < 8: 2^-21 absolute) in each term, plus one ulp of the result
    bound = sum(abs(a) for a in coefs) * 2.0**-21 + torch.finfo(torch.float32).eps * cpu.abs()
    worst = float(((cpu - gpu).abs() / bound).max())
    out["checks"].append({"name": "zo_perturb_ fp32 CPU vs GPU (share of the bound)", "ok": worst <= 1.0,
                          "value": worst, "bound": 1.0})
    numel = 2**28
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.zeros(numel, dtype=dtype, device="cuda")
        other = torch.empty_like(p)
        stats = interleaved({"zo_perturb_": lambda p=p: zo_perturb_(p, [1], [1e-3], stream=0),
                             "copy": lambda p=p, o=other: o.copy_(p)}, rounds=7, warmup=2, device="cuda")
        share = stats["copy"]["median"] / stats["zo_perturb_"]["median"]
        name = str(dtype).removeprefix("torch.")
        t = stats["zo_perturb_"]["median"]
        out[f"bandwidth_{name}"] = {"numel": numel, "perturb_median_s": t, "copy_median_s": stats["copy"]["median"],
                                    "share_of_copy": share, "perturb_GB_per_s": 2 * numel * p.element_size() / t / 1e9}
        out["goals"].append({"name": f"zo_perturb_ {name} bandwidth / device copy", "met": share >= 0.7,
                             "value": share, "goal": ">= 0.7"})
        del p, other
    return out
