"""Fused zeroth-order update: p <- p + Σ_j a_j · z(seed_j, stream, i) + c · p, in place, in one pass.

One read and one write of ``p``; z is regenerated in registers (Triton), in an L1-resident block buffer
(C++) or in bounded chunks (torch twin), never stored at ``p``'s size. With one term it perturbs
(a = ±ε) or flips (a = -2ε); with one term and c = -lr·wd it restores and updates; with two terms it
also applies the next perturbation (ZO2's fusion of the update of step t into the perturbation of
step t+1). Arithmetic is fp32 for fp32/bf16/fp16 parameters and fp64 for fp64 ones; the new value is
``p + (Σ_j a_j z_j + c p)``, rounded once to p's dtype. Every backend performs these operations in the
same order with the same roundings and no FMA contraction, so C++, torch and Triton give the same bits.
On CUDA a call is one kernel launch whose seeds and coefficients are scalar arguments (up to
``SCALAR_TERMS`` terms; each further term costs a share of one small host-to-device copy).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from memtrain._cpp import cpp_available, require_cpp, warn_fallback_once
from memtrain.kernels._launch import on_device_of, require_triton_device
from memtrain.kernels.philox import (
    HAS_TRITON,
    NOISE_LAUNCH,
    as_int64,
    check_float_tensor,
    dist_code,
    flat_memory_view,
    int32_words,
    launch_grid,
    noise_torch,
    torch_chunks,
)

# Noise terms passed to the Triton kernel as scalar arguments (seed words and coefficient): no host tensor,
# no host-to-device copy, nothing but the launch itself. ZO training uses one term (perturb, flip, restore)
# or two (update + next perturbation); the slots cover up to four. Further terms travel in one small int32
# tensor (seed words and coefficient bits, one host-to-device copy per call) and are read by every program:
# the result stays one pass with one rounding, bit for bit the C++ result, at the cost of that copy.
SCALAR_TERMS = 4

_bound = threading.local()  # .threads: the C++ kernels' thread bound in this thread (0: torch's count)


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the C++ CPU passes called in this thread (:func:`zo_perturb_`, :func:`cast_into`) on at most
    ``threads`` threads (None: torch's intra-op thread count, as outside the block).

    The bound is the calling thread's alone and touches no torch setting (``torch.set_num_threads`` is
    process-wide); AMP's host pass uses it to leave cores to the threads that launch the GPU work. The
    results do not depend on it, bit for bit. The torch fallback (no C++ extension) is not bounded.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"cpu_threads: threads must be an int >= 1 or None (torch's thread count), got {threads!r}")
    before = getattr(_bound, "threads", 0)
    _bound.threads = threads or 0
    try:
        yield
    finally:
        _bound.threads = before


def current_cpu_threads() -> int | None:
    """The bound :func:`cpu_threads` set in this thread (None: torch's intra-op thread count)."""
    return getattr(_bound, "threads", 0) or None


def cast_into(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out <- src`` rounded to nearest even (float32 -> bfloat16/float16, both contiguous on the CPU): AMP's
    host pass for a tensor without a pending update. Bit for bit ``out.copy_(src)`` but for a NaN's payload
    (bfloat16: 0x7FC0, as the fused pass of :func:`zo_perturb_` writes it); the C++ kernel runs on the
    threads :func:`cpu_threads` allows."""
    _check_cast(src, out, "cast_into")
    if cpp_available():
        require_cpp().cast_(src, out, getattr(_bound, "threads", 0))
    else:
        out.copy_(src)
    return out

if HAS_TRITON:
    import triton
    import triton.language as tl

    from memtrain.kernels.philox import _counters, _load_key, _noise_block, _store_rounded, _u32

    @triton.jit
    def _f64_from_words(lo, hi):
        """The float64 whose bits are (hi << 32) | lo (int32 bit patterns)."""
        bits = (_u32(hi).to(tl.uint64) << 32) | _u32(lo).to(tl.uint64)
        return bits.to(tl.float64, bitcast=True)

    @triton.jit(do_not_specialize=[
        "stream_lo", "stream_hi", "seed0_lo", "seed0_hi", "seed1_lo", "seed1_hi", "seed2_lo", "seed2_hi",
        "seed3_lo", "seed3_hi", "c64_lo", "c64_hi",
    ])
    def _zo_perturb_kernel(
        p_ptr, n, offset, stream_lo, stream_hi,
        seed0_lo, seed0_hi, a0, seed1_lo, seed1_hi, a1, seed2_lo, seed2_hi, a2, seed3_lo, seed3_hi, a3,
        extra_ptr, c, c64_lo, c64_hi,
        N_TERMS: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """p += Σ_j a_j z(seed_j) + c p over this program's block.

        Terms 0-3: scalar arguments (int32 key-word bit patterns, fp32 coefficients); terms 4 and up:
        ``extra_ptr`` = int32 [seed_lo, seed_hi, coefficient bits] per term. ``c`` is fp32(c) for
        fp32/bf16/fp16 parameters; float64 parameters use the exact double from (c64_lo, c64_hi).
        """
        counter, local = _counters(offset, BLOCK)
        s_lo = _u32(stream_lo)
        s_hi = _u32(stream_hi)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if N_TERMS > 0:
            acc += a0 * _noise_block(counter, s_lo, s_hi, _u32(seed0_lo), _u32(seed0_hi), DIST)
        if N_TERMS > 1:
            acc += a1 * _noise_block(counter, s_lo, s_hi, _u32(seed1_lo), _u32(seed1_hi), DIST)
        if N_TERMS > 2:
            acc += a2 * _noise_block(counter, s_lo, s_hi, _u32(seed2_lo), _u32(seed2_hi), DIST)
        if N_TERMS > 3:
            acc += a3 * _noise_block(counter, s_lo, s_hi, _u32(seed3_lo), _u32(seed3_hi), DIST)
        for j in tl.static_range(4, N_TERMS):
            a = tl.load(extra_ptr + 3 * (j - 4) + 2).to(tl.float32, bitcast=True)
            acc += a * _noise_block(counter, s_lo, s_hi, _load_key(extra_ptr, 3 * (j - 4)),
                                    _load_key(extra_ptr, 3 * (j - 4) + 1), DIST)
        mask = (local >= 0) & (local < n)
        p = tl.load(p_ptr + local, mask=mask)
        if p_ptr.dtype.element_ty == tl.float64:
            tl.store(p_ptr + local, p + (acc.to(tl.float64) + _f64_from_words(c64_lo, c64_hi) * p), mask=mask)
        else:
            pf = p.to(tl.float32)
            _store_rounded(p_ptr + local, pf + (acc + c * pf), mask)


def _extra_terms(seeds: Sequence[int], coefs: Sequence[float], device: torch.device) -> torch.Tensor:
    """int32 [seed_lo, seed_hi, fp32 coefficient bits] per term, on ``device`` (one copy from pinned memory)."""
    words = [w for seed in seeds for w in int32_words(seed)]
    host = torch.tensor(words, dtype=torch.int32).view(-1, 2)
    bits = torch.tensor([float(a) for a in coefs], dtype=torch.float32).view(torch.int32).view(-1, 1)
    host = torch.cat([host, bits], dim=1).reshape(-1)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _scalar_term_args(seeds: Sequence[int], coefs: Sequence[float]) -> list:
    """The kernel's scalar slots: (seed_lo, seed_hi, a) for the first SCALAR_TERMS terms, zeros after."""
    args: list = []
    for j in range(SCALAR_TERMS):
        if j < len(seeds):
            args.extend((*int32_words(seeds[j]), float(coefs[j])))
        else:
            args.extend((0, 0, 0.0))
    return args


def _zo_perturb_triton(
    p: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], stream: int, c: float, dist: int, offset: int
) -> None:
    require_triton_device("zo_perturb_", p)
    flat = flat_memory_view(p, "zo_perturb_")
    if flat.numel() == 0:
        return
    extra = _extra_terms(seeds[SCALAR_TERMS:], coefs[SCALAR_TERMS:], p.device) if len(seeds) > SCALAR_TERMS else flat
    c64_lo, c64_hi = int32_words(struct.unpack("<Q", struct.pack("<d", float(c)))[0])
    # 1024 elements (256 Philox counters) per program, 4 warps: each thread owns 8 elements of one block.
    # No FMA contraction: z and the update are the same bits as the C++ and torch twins (see philox.py).
    block = 1024
    with on_device_of(flat):
        _zo_perturb_kernel[launch_grid(flat.numel(), offset, block, "zo_perturb_")](
            flat, flat.numel(), offset, *int32_words(stream), *_scalar_term_args(seeds, coefs),
            extra, float(c), c64_lo, c64_hi,
            N_TERMS=len(seeds), DIST=dist, BLOCK=block, **NOISE_LAUNCH,
        )


def _zo_perturb_cpp(
    p: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], stream: int, c: float, dist: int, offset: int
) -> None:
    require_cpp().zo_axpbz_(
        flat_memory_view(p, "zo_perturb_"), [as_int64(s) for s in seeds], [float(a) for a in coefs],
        as_int64(stream), float(c), dist, offset, getattr(_bound, "threads", 0),
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


def _check_cast(p: torch.Tensor, out: torch.Tensor, op: str = "zo_perturb_") -> None:
    if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous():
        raise ValueError(f"{op}: the cast's source (the AMP master) must be a contiguous float32 CPU tensor, got "
                         f"{p.dtype} on {p.device}")
    if out.dtype not in (torch.bfloat16, torch.float16) or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous bfloat16/float16 CPU tensor, got {out.dtype} on "
                         f"{out.device}")
    if out.numel() != p.numel():
        raise ValueError(f"{op}: out has {out.numel()} elements but p has {p.numel()}; pass p's wire copy")


def zo_perturb_(
    p: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    stream: int = 0,
    c: float = 0.0,
    dist: str = "normal",
    offset: int = 0,
    out: torch.Tensor | None = None,
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
        out: AMP's host pass: a bfloat16/float16 tensor of p's size (p: contiguous float32 on the CPU) that
            receives the new p rounded to nearest even, in the same pass (one read of p, no second sweep);
            the C++ kernel splits it over threads, the torch fallback casts after the update.

    On the CPU the C++ kernel runs on torch's intra-op threads, or on at most the threads
    :func:`cpu_threads` allows in the calling thread; the result is the same bits either way.

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
    if out is not None:
        _check_cast(p, out)
        if cpp_available():
            require_cpp().zo_axpbz_cast_(p, out, [as_int64(s) for s in seeds], [float(a) for a in coefs],
                                         as_int64(stream), float(c), code, offset, getattr(_bound, "threads", 0))
        else:
            warn_fallback_once("zo_perturb_")
            _zo_perturb_torch(p, seeds, coefs, stream, c, code, offset)
            out.copy_(p)
        return p
    if p.device.type == "cuda":
        _zo_perturb_triton(p, seeds, coefs, stream, c, code, offset)
    elif cpp_available():
        _zo_perturb_cpp(p, seeds, coefs, stream, c, code, offset)
    else:
        warn_fallback_once("zo_perturb_")
        _zo_perturb_torch(p, seeds, coefs, stream, c, code, offset)
    return p
