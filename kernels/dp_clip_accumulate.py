"""Clipped sum of per-sample Linear gradients as one GEMM over the B·T rows.

``grad_w += Σ_b coef_b · G_bᵀ X_b = (diag(coef ⊗ 1_T) G)ᵀ X`` and ``grad_b += Σ_b coef_b Σ_t G_b[t]``,
with ``coef_b`` the clip factor of sample ``b`` (times any loss-reduction scale). ``G`` itself is never
modified. ``layout="in_out"`` writes ``Xᵀ(cG)`` instead, the layout of Hugging Face's GPT-2 ``Conv1D``
weight.

Backends and their precision:

- CPU and CUDA (the dispatcher's choice): scale the narrower operand into one temporary (rounded to
  its dtype: 2⁻⁸ relative for bf16) and run one BLAS GEMM, cuBLAS on CUDA. fp32 gradients from fp32
  inputs follow torch's matmul precision setting (IEEE fp32 unless TF32 was enabled, as for
  ``nn.Linear``); an fp32 gradient from bf16/fp16 inputs (autocast) is accumulated and written in fp32
  by cuBLAS where torch offers ``out_dtype``, else it receives the product rounded to the input dtype,
  which is what torch's own autocast weight gradient receives. The bias sum is fp32.
- Triton (``_dp_clip_accumulate_triton``): scales rows of G as they are loaded (no temporary), fp32
  accumulation, exact products (``input_precision="ieee"``; 16-bit inputs on tensor cores) and
  autotuned tiles up to 128×128×64. Not the default: one cuBLAS GEMM runs nearer the device's peak;
  bench/kernels/bench_dp_clip_accumulate.py measures both.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from memtrain.kernels._launch import checked_grid, interpreting, on_device_of, require_triton_device

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover
    _HAS_TRITON = False

__all__ = ["clip_factors", "dp_clip_accumulate_"]

if _HAS_TRITON:
    from memtrain.kernels._common import _dot_operand, _tile_offsets

    @triton.jit
    def _dp_clip_accumulate_kernel(
        g_ptr, x_ptr, coef_ptr, w_ptr, T, N_ROWS, D_OUT, D_IN,
        stride_gr, stride_go, stride_xr, stride_xi, stride_wo, stride_wi,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # grid: (n_o · n_i,) on axis 0; K loop over all B·T rows, rows scaled by coef[row // T] (fp32) and
        # rounded back to the input dtype before the dot (exact for fp32 inputs).
        pid = tl.program_id(0)
        n_i = tl.cdiv(D_IN, BLOCK_I)
        offs_o = (pid // n_i) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = (pid % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for r0 in range(0, N_ROWS, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < N_ROWS
            c = tl.load(coef_ptr + offs_r // T, mask=rmask, other=0.0)
            gt = tl.load(g_ptr + _tile_offsets(offs_o, stride_go, offs_r, stride_gr),
                         mask=(offs_o[:, None] < D_OUT) & rmask[None, :], other=0.0)
            x = tl.load(x_ptr + _tile_offsets(offs_r, stride_xr, offs_i, stride_xi),
                        mask=rmask[:, None] & (offs_i[None, :] < D_IN), other=0.0)
            gt = (gt.to(tl.float32) * c[None, :]).to(x.dtype)
            acc = tl.dot(_dot_operand(gt), _dot_operand(x), acc, input_precision="ieee")
        wmask = (offs_o[:, None] < D_OUT) & (offs_i[None, :] < D_IN)
        w_ptrs = w_ptr + _tile_offsets(offs_o, stride_wo, offs_i, stride_wi)
        prev = tl.load(w_ptrs, mask=wmask, other=0.0)
        tl.store(w_ptrs, (prev.to(tl.float32) + acc).to(w_ptr.dtype.element_ty), mask=wmask)


def clip_factors(sq_norms: Tensor, max_norm: float, scale: float = 1.0) -> Tensor:
    """Row coefficients ``scale · min(1, C / (scale·‖g_b‖ + 1e-6))`` from raw squared norms.

    ``scale`` turns the raw per-sample gradient ``G_bᵀX_b`` into the sample's gradient (the batch size
    for a mean-reduced loss), so the clipped contribution ``coef_b · G_bᵀX_b`` has norm ≤ C.
    """
    norms = sq_norms.clamp_min(0).sqrt() * scale
    return (max_norm / (norms + 1e-6)).clamp(max=1.0) * scale


def _check(G: Tensor, X: Tensor, coef: Tensor, grad_w: Tensor | None, layout: str) -> None:
    if G.dim() != 3 or X.dim() != 3 or G.shape[:2] != X.shape[:2] or coef.shape != (G.shape[0],):
        raise ValueError(
            f"dp_clip_accumulate_: expected G (B, T, out), X (B, T, in), coef (B,), got {tuple(G.shape)}, "
            f"{tuple(X.shape)}, {tuple(coef.shape)}"
        )
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"dp_clip_accumulate_: layout must be 'out_in' or 'in_out', got {layout!r}")
    if grad_w is not None:
        want = (G.shape[2], X.shape[2]) if layout == "out_in" else (X.shape[2], G.shape[2])
        if tuple(grad_w.shape) != want:
            raise ValueError(f"dp_clip_accumulate_: grad_w has shape {tuple(grad_w.shape)}, expected {want}")


def accumulate_grid(d_out: int, d_in: int, block_o: int, block_i: int) -> tuple[int]:
    """The Triton kernel's grid, ``(n_o · n_i,)``, checked against CUDA's limits."""
    n = -(-d_out // block_o) * -(-d_in // block_i)
    return checked_grid((n,), "dp_clip_accumulate_", f"{d_out}x{d_in} in {block_o}x{block_i} tiles")


_TILES_16BIT = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
_TILES_FP32 = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 16, 8, 2)]
_INTERPRETER_TILE = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_R": 16}


@functools.cache
def _autotuned(sixteen_bit: bool):
    """The kernel under the autotuner, built on first launch. Benchmark runs add into grad_w: the autotuner
    saves it before each run and restores it after."""
    tiles = _TILES_16BIT if sixteen_bit else _TILES_FP32
    configs = [triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_R": r}, num_warps=w, num_stages=s)
               for o, i, r, w, s in tiles]
    return triton.autotune(configs=configs, key=["D_OUT", "D_IN"], restore_value=["w_ptr"])(
        _dp_clip_accumulate_kernel)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values accumulate in: float64 for float64, float32 for everything else (16-bit
    inputs must not accumulate in their own dtype; a float64 model must not lose its precision to fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_sum(G: Tensor, coef: Tensor) -> Tensor:
    """``Σ_b coef_b Σ_t G_b[t]`` in ``accum_dtype(G.dtype)``, without a widened copy of G."""
    acc = accum_dtype(G.dtype)
    return coef.to(acc) @ G.sum(1, dtype=acc)


def _dp_clip_accumulate_triton(G: Tensor, X: Tensor, coef: Tensor, grad_w: Tensor | None,
                               grad_b: Tensor | None, layout: str, overwrite: bool = False,
                               config: dict | None = None) -> None:
    """Triton kernel; ``config`` (BLOCK_* and optionally num_warps/num_stages) bypasses autotuning."""
    _check(G, X, coef, grad_w, layout)
    require_triton_device("dp_clip_accumulate_", G, X, grad_w)
    if overwrite and grad_w is not None:
        grad_w.zero_()
    B, T, d_out = G.shape
    d_in = X.shape[2]
    if B * T == 0:
        return
    coef = coef.to(torch.float32).contiguous()
    if grad_w is not None:
        if G.dtype != X.dtype:
            dtype = torch.promote_types(G.dtype, X.dtype)
            G, X = G.to(dtype), X.to(dtype)
        g2 = G.reshape(B * T, d_out)
        x2 = X.reshape(B * T, d_in)
        sw = grad_w.stride() if layout == "out_in" else grad_w.stride()[::-1]
        args = (g2, x2, coef, grad_w, T, B * T, d_out, d_in, *g2.stride(), *x2.stride(), *sw)
        if config is None and interpreting():
            config = _INTERPRETER_TILE
        with on_device_of(g2):
            if config is not None:
                _dp_clip_accumulate_kernel[accumulate_grid(d_out, d_in, config["BLOCK_O"], config["BLOCK_I"])](
                    *args, **config, enable_fp_fusion=True)
            else:
                kernel = _autotuned(G.dtype in (torch.bfloat16, torch.float16))
                kernel[lambda m: accumulate_grid(d_out, d_in, m["BLOCK_O"], m["BLOCK_I"])](*args,
                                                                                           enable_fp_fusion=True)
    if grad_b is not None:
        grad_b.add_(_bias_sum(G, coef).to(grad_b.dtype))


@functools.cache
def _has_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


_addmm_fp32_refused: list[bool] = []  # set once when this torch refuses an fp32 `self` with 16-bit operands


def _mm_into_fp32(grad_w: Tensor, a: Tensor, b: Tensor, overwrite: bool) -> None:
    """fp32 ``grad_w (+)= a @ b`` for 16-bit CUDA operands, accumulated and written in fp32 by cuBLAS."""
    if overwrite:
        torch.mm(a, b, out_dtype=torch.float32, out=grad_w)
        return
    if not _addmm_fp32_refused:
        try:
            torch.addmm(grad_w, a, b, out_dtype=torch.float32, out=grad_w)
            return
        except RuntimeError:  # older torch: `self` must have the operands' dtype; checked before any work
            _addmm_fp32_refused.append(True)
    rows = max(1, (64 << 20) // (4 * b.shape[1]))  # fp32 temporaries of at most 64 MiB
    for r in range(0, a.shape[0], rows):
        grad_w[r:r + rows].add_(torch.mm(a[r:r + rows], b, out_dtype=torch.float32))


def _dp_clip_accumulate_torch(G: Tensor, X: Tensor, coef: Tensor, grad_w: Tensor | None,
                              grad_b: Tensor | None, layout: str, overwrite: bool = False) -> None:
    _check(G, X, coef, grad_w, layout)
    B, T, d_out = G.shape
    if B * T == 0:
        if overwrite and grad_w is not None:
            grad_w.zero_()
        return
    # (cG)ᵀX = Gᵀ(cX): scale the narrower operand, so the temporary is min(out, in)·B·T elements (an LM
    # head scales X (B·T×512), not G (B·T×32000): 8 MiB instead of 500 MiB at B=32, T=128).
    c = coef.to(G.dtype).view(B, 1, 1)
    d_in = X.shape[2]
    scale_g = d_out <= d_in or grad_w is None
    g2 = (G * c if scale_g else G).reshape(B * T, d_out)
    if grad_w is not None:
        x2 = (X if scale_g else X * c.to(X.dtype)).reshape(B * T, d_in)
        if x2.dtype != g2.dtype:
            dtype = torch.promote_types(g2.dtype, x2.dtype)
            g2, x2 = g2.to(dtype), x2.to(dtype)
        a, b = (g2.t(), x2) if layout == "out_in" else (x2.t(), g2)
        if grad_w.dtype == g2.dtype:
            grad_w.addmm_(a, b, beta=0 if overwrite else 1)  # beta=0 ignores grad_w's (uninitialised) values
        elif (grad_w.dtype == torch.float32 and g2.dtype in (torch.bfloat16, torch.float16)
              and grad_w.device.type == "cuda" and _has_out_dtype()):
            _mm_into_fp32(grad_w, a, b, overwrite)
        elif overwrite:
            grad_w.copy_(torch.mm(a, b))
        else:
            grad_w.add_(torch.mm(a, b))
    if grad_b is not None:
        gsum = g2.sum(0, dtype=accum_dtype(g2.dtype)) if scale_g else _bias_sum(G, coef)
        grad_b.add_(gsum.to(grad_b.dtype))


def dp_clip_accumulate_(G: Tensor, X: Tensor, coef: Tensor, grad_w: Tensor | None, grad_b: Tensor | None = None,
                        *, layout: str = "out_in", overwrite: bool = False) -> None:
    """Add the row-scaled GEMM ``(coef ⊙ G)ᵀ X`` to ``grad_w`` and ``Σ (coef ⊙ G)`` to ``grad_b`` in place.

    Args:
        G: output gradient, (B, T, out); not modified.
        X: layer input, (B, T, in).
        coef: (B,) per-sample row scale (clip factor times loss scale).
        grad_w: (out, in) for ``layout="out_in"``, (in, out) for ``"in_out"``; or None to skip.
        grad_b: (out,) or None.
        layout: weight layout, see above.
        overwrite: write ``grad_w`` instead of adding to it (a fresh ``empty`` buffer: saves a fill and a pass).
    """
    _dp_clip_accumulate_torch(G, X, coef, grad_w, grad_b, layout, overwrite)
