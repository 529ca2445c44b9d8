"""Counter-based noise z(seed, stream, i): Philox4x32-10 with a Box-Muller or Rademacher transform.

The stream is defined once, in ``csrc/philox.h``; this module holds its Triton twin (device functions
used by every noise kernel, plus the fill kernel ``_philox_fill_kernel``) and its torch twin (the
always-available fallback). All of them evaluate the same fp32 operations, each rounded once to
nearest-even and none contracted into an FMA, so z is the same bits on every backend:

- C++ (csrc/zo_cpu.cpp): built with ``-ffp-contract=off`` and without ``-ffast-math`` (setup.py);
- Triton: ``tl.div_rn`` / ``tl.sqrt_rn`` (correctly rounded; plain ``/`` and ``tl.sqrt`` lower to
  approximate PTX instructions on NVIDIA GPUs) and launches with ``enable_fp_fusion=False``, so the
  PTX holds ``mul.rn`` / ``add.rn``, which ptxas may not contract;
- torch twin: one torch op per operation; the square root is taken in float64 and rounded once to
  fp32 (torch's own fp32 ``sqrt`` on CPU is not always correctly rounded; a float64 square root
  rounded to fp32 is, since 53 >= 2·24 + 2).

``philox_fill_(out, seed, stream)`` writes z into ``out``; it exists to inspect and test the stream
(the optimisers never materialise z: see :mod:`memtrain.kernels.zo_perturb`).
Memory traffic: one write of ``out``.
"""

from __future__ import annotations

import torch

from memtrain._cpp import cpp_available, require_cpp, warn_fallback_once
from memtrain.kernels._launch import checked_grid, on_device_of, require_triton_device

try:  # Triton is optional: CPU use never needs it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

MASK32 = 0xFFFFFFFF
PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
DISTRIBUTIONS = {"normal": 0, "rademacher": 1}
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Elements per torch-twin chunk: bounds the fallback's temporaries (~40 int64/fp32 arrays of this size, ~20 MB).
TORCH_CHUNK = 1 << 16


def dist_code(dist: str) -> int:
    """Map 'normal' / 'rademacher' to the kernels' integer code, with a clear error otherwise."""
    try:
        return DISTRIBUTIONS[dist]
    except KeyError:
        raise ValueError(f"dist must be one of {sorted(DISTRIBUTIONS)}, got {dist!r}") from None


def split64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a 64-bit unsigned value (negative values wrap modulo 2**64)."""
    value %= 1 << 64
    return value & MASK32, value >> 32


def int32_words(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a 64-bit value as signed int32 bit patterns: the form Triton kernels take.

    Triton types a Python int argument by its value (int32, then int64/uint64), so passing raw uint32
    words would compile a second kernel whenever a word reaches 2**31; signed patterns always type as
    int32 and the kernels reinterpret them as uint32.
    """
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in split64(value))


def as_int64(value: int) -> int:
    """A 64-bit unsigned value as the signed int64 that C++ receives."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a gap-free, non-overlapping memory range (a permuted contiguous layout)."""
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride(), strict=True) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_memory_view(t: torch.Tensor, op: str) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in memory order (z is addressed by memory position).

    Contiguous tensors and dense permuted ones (a transposed weight, channels-last) qualify; views with
    gaps or overlaps do not, because updating them through their storage would touch other elements.
    """
    if t.is_contiguous():
        return t.view(-1)
    if is_dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    raise ValueError(
        f"{op}: expected a dense tensor, got shape {tuple(t.shape)} with strides {t.stride()} (a view with "
        "gaps or overlaps); apply it to the tensor this view was taken from, or to a .contiguous() copy"
    )


def check_float_tensor(t: torch.Tensor, op: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected a float32, float64, bfloat16 or float16 tensor, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: tensors on {t.device.type} are not supported; move them to cpu or cuda")


# ----------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:

    @triton.jit
    def _philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 blocks (counter words c0..c3, key words k0, k1)."""
        for _ in tl.static_range(10):
            lo0 = c0 * 0xD2511F53
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo1 = c2 * 0xCD9E8D57
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            c0 = hi1 ^ c1 ^ k0
            c2 = hi0 ^ c3 ^ k1
            c1 = lo1
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _unit_open(x):
        return (x >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08

    @triton.jit
    def _log_positive(x):
        """ln(x) for normal x > 0: the branch-free routine of csrc/philox.h, operation for operation."""
        shifted = x.to(tl.uint32, bitcast=True) + (0x3F800000 - 0x3F3504F3)
        k = ((shifted >> 23).to(tl.int32) - 127).to(tl.float32)
        f = ((shifted & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
        s = tl.div_rn(f, 2.0 + f)
        s2 = s * s
        tail = s2 * (0.666666666666666667 + s2 * (0.4 + s2 * (0.285714285714285714 + s2 * 0.222222222222222222)))
        return k * 0.693145751953125 + (2.0 * s + (s * tail + k * 1.428606765330187e-06))

    @triton.jit
    def _sincos_2pi(u):
        """(cos 2πu, sin 2πu) for u in [0, 1]: exact quadrant reduction, then Taylor series on |a| <= π/4."""
        q = tl.floor(4.0 * u + 0.5)
        a = (u - 0.25 * q) * 6.28318530717958647692
        a2 = a * a
        sa = a * (1.0 + a2 * (-1.66666666666666667e-01 + a2 * (
            8.33333333333333333e-03 + a2 * (-1.98412698412698413e-04 + a2 * 2.75573192239858907e-06))))
        ca = 1.0 + a2 * (-0.5 + a2 * (4.16666666666666667e-02 + a2 * (
            -1.38888888888888889e-03 + a2 * (2.48015873015873016e-05 + a2 * -2.75573192239858907e-07))))
        quadrant = q.to(tl.int32) & 3
        c = tl.where(quadrant == 0, ca, tl.where(quadrant == 1, -sa, tl.where(quadrant == 2, -ca, sa)))
        s = tl.where(quadrant == 0, sa, tl.where(quadrant == 1, ca, tl.where(quadrant == 2, -sa, -ca)))
        return c, s

    @triton.jit
    def _noise_block(counter, stream_lo, stream_hi, seed_lo, seed_hi, DIST: tl.constexpr):
        """z for the 4·len(counter) elements of the given Philox counters (int64), in element order.

        The key words are uint32 scalars (see :func:`_u32`). Callers launch with ``enable_fp_fusion=False``.
        """
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = (counter >> 32).to(tl.uint32)
        c2 = tl.zeros_like(c0) + stream_lo
        c3 = tl.zeros_like(c0) + stream_hi
        w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
        if DIST == 1:
            z0 = tl.where((w0 >> 31) != 0, 1.0, -1.0)
            z1 = tl.where((w1 >> 31) != 0, 1.0, -1.0)
            z2 = tl.where((w2 >> 31) != 0, 1.0, -1.0)
            z3 = tl.where((w3 >> 31) != 0, 1.0, -1.0)
        else:
            r01 = tl.sqrt_rn(-2.0 * _log_positive(_unit_open(w0)))
            cos01, sin01 = _sincos_2pi(_unit_open(w1))
            r23 = tl.sqrt_rn(-2.0 * _log_positive(_unit_open(w2)))
            cos23, sin23 = _sincos_2pi(_unit_open(w3))
            z0 = r01 * cos01
            z1 = r01 * sin01
            z2 = r23 * cos23
            z3 = r23 * sin23
        # [n, i, k] = z_{2i+k}: row-major order puts z_j of counter n at element 4n + j.
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
        return tl.reshape(z, [4 * counter.shape[0]])

    @triton.jit
    def _store_rounded(ptr, value, mask):
        """Store fp32 ``value`` into ptr's dtype, rounding to nearest even.

        bf16 rounding is done on the bits (as csrc/zo_cpu.cpp does) because the Triton interpreter's own
        fp32 -> bf16 cast truncates, which would make CPU interpreter tests disagree with the GPU.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            u = value.to(tl.uint32, bitcast=True)
            is_nan = (u & 0x7FFFFFFF) > 0x7F800000
            u = tl.where(is_nan, 0x7FC00000, u + 0x7FFF + ((u >> 16) & 1))
            tl.store(ptr, (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_key(words_ptr, index):
        return tl.load(words_ptr + index).to(tl.uint32, bitcast=True)

    @triton.jit
    def _u32(word):
        """An int32 scalar argument (a bit pattern from :func:`int32_words`) as uint32."""
        return word.to(tl.uint32, bitcast=True)

    @triton.jit
    def _counters(offset, BLOCK: tl.constexpr):
        """(Philox counters, element index relative to ``offset``) of this program's block, both int64."""
        pid = tl.program_id(0).to(tl.int64)
        first = offset // 4  # int32 or int64 scalar; the sums below are int64 through pid
        counter = first + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        local = 4 * first + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64) - offset
        return counter, local

    # The key words vary per call: never specialise on their values (a word equal to 1 or divisible by 16
    # would otherwise compile a kernel variant of its own).
    @triton.jit(do_not_specialize=["stream_lo", "stream_hi", "seed_lo", "seed_hi"])
    def _philox_fill_kernel(out_ptr, n, offset, stream_lo, stream_hi, seed_lo, seed_hi,
                            DIST: tl.constexpr, BLOCK: tl.constexpr):
        """out[l] = z(seed, stream, offset + l); key words as int32 bit patterns."""
        counter, local = _counters(offset, BLOCK)
        z = _noise_block(counter, _u32(stream_lo), _u32(stream_hi), _u32(seed_lo), _u32(seed_hi), DIST)
        mask = (local >= 0) & (local < n)
        _store_rounded(out_ptr + local, z, mask)


# Launch options of the noise kernels: no FMA contraction (z is the same bits as the C++ and torch twins).
NOISE_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}


def launch_grid(numel: int, offset: int, block: int, op: str = "philox_fill_") -> tuple[int]:
    """Programs needed to cover elements [offset, offset + numel) in counter-aligned blocks (axis 0 only)."""
    first = (offset // 4) * 4
    return checked_grid((-(-(offset + numel - first) // block),), op, f"{numel} elements")


def _philox_fill_triton(out: torch.Tensor, seed: int, stream: int, dist: int, offset: int) -> None:
    require_triton_device("philox_fill_", out)
    flat = flat_memory_view(out, "philox_fill_")
    if flat.numel() == 0:
        return
    block = 1024
    with on_device_of(flat):
        _philox_fill_kernel[launch_grid(flat.numel(), offset, block)](
            flat, flat.numel(), offset, *int32_words(stream), *int32_words(seed), DIST=dist, BLOCK=block,
            **NOISE_LAUNCH,
        )


def _philox_fill_cpp(out: torch.Tensor, seed: int, stream: int, dist: int, offset: int) -> None:
    require_cpp().philox_fill_(flat_memory_view(out, "philox_fill_"), as_int64(seed), as_int64(stream), dist, offset)


# ------------------------------------------------------------------------------------------ torch twin
def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for uint32 values held in int64 (16-bit split: no overflow)."""
    t_lo = (a & 0xFFFF) * m
    t_hi = (a >> 16) * m
    mid = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10_torch(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_MUL[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_WEYL[0]) & MASK32
        k1 = (k1 + PHILOX_WEYL[1]) & MASK32
    return c0, c1, c2, c3


def _unit_open_torch(w: torch.Tensor) -> torch.Tensor:
    return (w >> 9).to(torch.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08


def _log_positive_torch(x: torch.Tensor) -> torch.Tensor:
    shifted = (x.view(torch.int32).to(torch.int64) + (0x3F800000 - 0x3F3504F3)) & MASK32
    k = ((shifted >> 23) - 127).to(torch.float32)
    f = ((shifted & 0x007FFFFF) + 0x3F3504F3).to(torch.int32).view(torch.float32) - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    tail = s2 * (0.666666666666666667 + s2 * (0.4 + s2 * (0.285714285714285714 + s2 * 0.222222222222222222)))
    return k * 0.693145751953125 + (2.0 * s + (s * tail + k * 1.428606765330187e-06))


def _sincos_2pi_torch(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.floor(4.0 * u + 0.5)
    a = (u - 0.25 * q) * 6.28318530717958647692
    a2 = a * a
    sa = a * (1.0 + a2 * (-1.66666666666666667e-01 + a2 * (
        8.33333333333333333e-03 + a2 * (-1.98412698412698413e-04 + a2 * 2.75573192239858907e-06))))
    ca = 1.0 + a2 * (-0.5 + a2 * (4.16666666666666667e-02 + a2 * (
        -1.38888888888888889e-03 + a2 * (2.48015873015873016e-05 + a2 * -2.75573192239858907e-07))))
    quadrant = q.to(torch.int64) & 3
    c = torch.where(quadrant == 0, ca, torch.where(quadrant == 1, -sa, torch.where(quadrant == 2, -ca, sa)))
    s = torch.where(quadrant == 0, sa, torch.where(quadrant == 1, ca, torch.where(quadrant == 2, -sa, -ca)))
    return c, s


def noise_torch(numel: int, seed: int, stream: int, dist: int, offset: int, device: torch.device) -> torch.Tensor:
    """z(seed, stream, offset + i) for i < numel as an fp32 tensor (torch twin of csrc/philox.h)."""
    first = offset // 4
    end = (offset + numel + 3) // 4
    counter = torch.arange(first, end, dtype=torch.int64, device=device)
    s_lo, s_hi = split64(stream)
    words = philox4x32_10_torch(
        (counter & MASK32, counter >> 32, torch.full_like(counter, s_lo), torch.full_like(counter, s_hi)),
        split64(seed),
    )
    if dist == DISTRIBUTIONS["rademacher"]:
        z = [torch.where((w >> 31) != 0, 1.0, -1.0).to(torch.float32) for w in words]
    else:
        z = []
        for a, b in ((words[0], words[1]), (words[2], words[3])):
            # float64 square root rounded once to fp32: the correctly rounded fp32 square root
            radius = torch.sqrt((-2.0 * _log_positive_torch(_unit_open_torch(a))).double()).float()
            c, s = _sincos_2pi_torch(_unit_open_torch(b))
            z.extend((radius * c, radius * s))
    flat = torch.stack(z, dim=1).reshape(-1)
    start = offset - 4 * first
    return flat[start : start + numel]


def torch_chunks(numel: int):
    """(start, length) of chunks of at most TORCH_CHUNK elements covering [0, numel)."""
    for start in range(0, numel, TORCH_CHUNK):
        yield start, min(TORCH_CHUNK, numel - start)


def _philox_fill_torch(out: torch.Tensor, seed: int, stream: int, dist: int, offset: int) -> None:
    flat = flat_memory_view(out, "philox_fill_")
    for start, length in torch_chunks(flat.numel()):
        flat[start : start + length] = noise_torch(length, seed, stream, dist, offset + start, flat.device)


# ------------------------------------------------------------------------------------------ dispatcher
def philox_fill_(out: torch.Tensor, seed: int, stream: int = 0, dist: str = "normal", offset: int = 0) -> torch.Tensor:
    """Fill ``out`` in place with z(seed, stream, offset + i) and return it.

    Args:
        out: float32/float64/bfloat16/float16 tensor on CPU or CUDA, any shape (elements in memory order).
        seed: 64-bit key of the stream (Python int; wraps modulo 2**64).
        stream: 64-bit stream id (memtrain uses one per parameter).
        dist: "normal" (Box-Muller, |z| <= 5.77) or "rademacher" (±1).
        offset: index of ``out``'s first element in the stream (>= 0).
    """
    check_float_tensor(out, "philox_fill_")
    code = dist_code(dist)
    if offset < 0:
        raise ValueError(f"philox_fill_: offset must be >= 0, got {offset}")
    if out.device.type == "cuda":
        _philox_fill_triton(out, seed, stream, code, offset)
    elif cpp_available():
        _philox_fill_cpp(out, seed, stream, code, offset)
    else:
        warn_fallback_once("philox_fill_")
        _philox_fill_torch(out, seed, stream, code, offset)
    return out
