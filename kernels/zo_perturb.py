"""Fused zeroth-order update: p <- p + Σ_j a_j · z(seed_j, stream, i) + c · p, in place, in one pass.

One read and one write of ``p``; z is regenerated in registers (Triton), in an L1-resident block buffer
(C++) or in bounded chunks (torch twin), never stored at ``p``'s size. With one term it perturbs
(a = ±ε) or flips (a = -2ε); with one term and c = -lr·wd it restores and updates; with two terms it
also applies the next perturbation (ZO2's fusion of the update of step t into the perturbation of
step t+1). Arithmetic is fp32 for fp32/bf16/fp16 parameters and fp64 for fp64 ones; the new value is
``p + (Σ_j a_j z_j + c p)``, rounded once to p's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memtrain._cpp import cpp_available, require_cpp, warn_fallback_once
from memtrain.kernels.philox import (
    HAS_TRITON,
    as_int64,
    check_float_tensor,
    dist_code,
    flat_memory_view,
    key_words,
    launch_grid,
    noise_torch,
    torch_chunks,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from memtrain.kernels.philox import _load_key, _noise_block, _store_rounded

    @triton.jit
    def _zo_perturb_kernel(
        p_ptr, n, offset, words_ptr, coefs_ptr, c,
        N_TERMS: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """words = [stream_lo, stream_hi, seed_j_lo, seed_j_hi ...] (int32 bits), coefs = [a_j] (fp32)."""
        pid = tl.program_id(0).to(tl.int64)
        first = offset // 4
        counter = first + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        stream_lo = _load_key(words_ptr, 0)
        stream_hi = _load_key(words_ptr, 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(N_TERMS):
            z = _noise_block(counter, stream_lo, stream_hi, _load_key(words_ptr, 2 + 2 * j),
                             _load_key(words_ptr, 3 + 2 * j), DIST)
            acc += tl.load(coefs_ptr + j) * z
        local = 4 * first + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64) - offset
        mask = (local >= 0) & (local < n)
        p = tl.load(p_ptr + local, mask=mask)
        if p_ptr.dtype.element_ty == tl.float64:
            tl.store(p_ptr + local, p + (acc.to(tl.float64) + c * p), mask=mask)
        else:
            pf = p.to(tl.float32)
            _store_rounded(p_ptr + local, pf + (acc + c * pf), mask)


def _coef_tensor(coefs: Sequence[float], device: torch.device) -> torch.Tensor:
    host = torch.tensor([float(a) for a in coefs], dtype=torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _zo_perturb_triton(
    p: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], stream: int, c: float, dist: int, offset: int
) -> None:
    flat = flat_memory_view(p, "zo_perturb_")
    if flat.numel() == 0:
        return
    # 1024 elements (256 Philox counters) per program, 4 warps: each thread owns 8 elements of one block.
    block = 1024
    _zo_perturb_kernel[launch_grid(flat.numel(), offset, block)](
        flat, flat.numel(), offset, key_words(stream, seeds, p.device), _coef_tensor(coefs, p.device), float(c),
        N_TERMS=len(seeds), DIST=dist, BLOCK=block, num_warps=4,
    )


def _zo_perturb_cpp(
    p: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], stream: int, c: float, dist: int, offset: int
) -> None:
    require_cpp().zo_axpbz_(
        flat_memory_view(p, "zo_perturb_"), [as_int64(s) for s in seeds], [float(a) for a in coefs],
        as_int64(stream), float(c), dist, offset,
    )


def _zo_perturb_torch(
    p: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], stream: int, c: float, dist: int, offset: int
) -> None:
    flat = flat_memory_view(p, "zo_perturb_")
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    for start, length in torch_chunks(flat.numel()):
        acc = torch.zeros(length, dtype=torch.float32, device=p.device)
        for seed, a in zip(seeds, coefs, strict=True):
            acc += float(a) * noise_torch(length, seed, stream, dist, offset + start, p.device)
        chunk = flat[start : start + length]
        v = chunk.to(compute)
        chunk.copy_(v + (acc.to(compute) + float(c) * v))


def zo_perturb_(
    p: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    stream: int = 0,
    c: float = 0.0,
    dist: str = "normal",
    offset: int = 0,
) -> torch.Tensor:
    """``p <- p + Σ_j coefs[j] · z(seeds[j], stream, offset + i) + c · p`` in place; returns ``p``.

    Args:
        p: float32/float64/bfloat16/float16 tensor on CPU or CUDA, any shape; contiguous or a dense permuted
            layout (elements are addressed in memory order).
        seeds: 64-bit stream keys, one per noise term (an empty list applies only ``c · p``).
        coefs: the coefficient a_j of each term.
        stream: 64-bit stream id shared by the terms (memtrain uses one per parameter).
        c: multiple of ``p`` added to it (``-lr * weight_decay`` for decoupled decay).
        dist: "normal" or "rademacher".
        offset: index of ``p``'s first element in the stream (for slices of a larger parameter).

    Raises:
        TypeError / ValueError: on an unsupported dtype or device, a view with gaps, a seed/coefficient
            count mismatch, or a negative offset.
    """
    check_float_tensor(p, "zo_perturb_")
    code = dist_code(dist)
    seeds, coefs = list(seeds), list(coefs)
    if len(seeds) != len(coefs):
        raise ValueError(f"zo_perturb_: got {len(seeds)} seeds but {len(coefs)} coefficients; pass one per seed")
    if offset < 0:
        raise ValueError(f"zo_perturb_: offset must be >= 0, got {offset}")
    if p.device.type == "cuda":
        _zo_perturb_triton(p, seeds, coefs, stream, c, code, offset)
    elif cpp_available():
        _zo_perturb_cpp(p, seeds, coefs, stream, c, code, offset)
    else:
        warn_fallback_once("zo_perturb_")
        _zo_perturb_torch(p, seeds, coefs, stream, c, code, offset)
    return p
