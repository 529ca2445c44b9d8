"""Triton device functions shared by the DP kernels: int64 address arithmetic and dot operands.

Offsets: Triton types ``tl.arange``, ``tl.program_id`` and a small integer argument (a stride) as int32,
and an int32 product wraps silently. An LM head's gradient holds B·T·V elements (V = 128256, B·T = 16.7k
already passes 2³¹), so every element offset is formed in int64: indices are promoted *before* they
meet a stride. tests/kernels/test_index_arithmetic.py evaluates these functions at such shapes.

Dot operands: compiled kernels multiply 16-bit operands on tensor cores (exact products, fp32
accumulation). Triton's CPU interpreter (3.9) multiplies 16-bit dot operands as their raw integer bits,
so under ``TRITON_INTERPRET=1`` they are widened to fp32 first: the same exact products.
"""

from __future__ import annotations

from memtrain.kernels._launch import interpreting

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - platform without Triton
    HAS_TRITON = False

__all__: list[str] = []

if HAS_TRITON:

    @triton.jit
    def _sample_offset(b, stride_b):
        """Offset of sample ``b``'s first element: ``b · stride_b`` in int64."""
        return b.to(tl.int64) * stride_b

    @triton.jit
    def _tile_offsets(rows, stride_r, cols, stride_c):
        """int64 offsets ``rows[:, None] · stride_r + cols[None, :] · stride_c`` of a 2-D tile."""
        return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c

    # TRITON_INTERPRET is read when @triton.jit runs, as here: the choice matches the kernels' own mode.
    if interpreting():

        @triton.jit
        def _dot_operand(x):
            return x.to(tl.float32)

    else:

        @triton.jit
        def _dot_operand(x):
            return x
