"""Clipped sum of per-sample Linear gradients as one GEMM over the B·T rows.

``grad_w += Σ_b coef_b · G_bᵀ X_b = (diag(coef ⊗ 1_T) G)ᵀ X`` and ``grad_b += Σ_b coef_b Σ_t G_b[t]``,
with ``coef_b`` the clip factor of sample ``b`` (times any loss-reduction scale). Rows of G are scaled
as they are loaded (Triton) or in one new tensor (torch); ``G`` itself is never modified. The
accumulation is fp32 whatever the input dtype. ``layout="in_out"`` writes ``Xᵀ(cG)`` instead, the
layout of Hugging Face's GPT-2 ``Conv1D`` weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover
    _HAS_TRITON = False

__all__ = ["clip_factors", "dp_clip_accumulate_"]

if _HAS_TRITON:

    @triton.jit
    def _dp_clip_accumulate_kernel(
        g_ptr, x_ptr, coef_ptr, w_ptr, T, N_ROWS, D_OUT, D_IN,
        stride_gr, stride_go, stride_xr, stride_xi, stride_wo, stride_wi,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # grid: (cdiv(out, BLOCK_O), cdiv(in, BLOCK_I)); K loop over all B·T rows, rows scaled by coef[row // T].
        po = tl.program_id(0)
        pi = tl.program_id(1)
        offs_o = po * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for r0 in range(0, N_ROWS, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < N_ROWS
            c = tl.load(coef_ptr + offs_r // T, mask=rmask, other=0.0)
            gt = tl.load(g_ptr + offs_r[None, :] * stride_gr + offs_o[:, None] * stride_go,
                         mask=rmask[None, :] & (offs_o[:, None] < D_OUT), other=0.0)
            x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_i[None, :] * stride_xi,
                        mask=rmask[:, None] & (offs_i[None, :] < D_IN), other=0.0)
            acc += tl.dot(gt.to(tl.float32) * c[None, :], x.to(tl.float32))
        wmask = (offs_o[:, None] < D_OUT) & (offs_i[None, :] < D_IN)
        w_ptrs = w_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
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


def _dp_clip_accumulate_triton(G: Tensor, X: Tensor, coef: Tensor, grad_w: Tensor | None,
                               grad_b: Tensor | None, layout: str, overwrite: bool = False) -> None:
    _check(G, X, coef, grad_w, layout)
    if overwrite and grad_w is not None:
        grad_w.zero_()
    B, T, d_out = G.shape
    d_in = X.shape[2]
    if B * T == 0:
        return
    coef = coef.to(torch.float32).contiguous()
    if grad_w is not None:
        g2 = G.reshape(B * T, d_out)
        x2 = X.reshape(B * T, d_in)
        sw = grad_w.stride() if layout == "out_in" else grad_w.stride()[::-1]
        BO, BI, BR = 32, 32, 16
        grid = (triton.cdiv(d_out, BO), triton.cdiv(d_in, BI))
        _dp_clip_accumulate_kernel[grid](
            g2, x2, coef, grad_w, T, B * T, d_out, d_in, *g2.stride(), *x2.stride(), *sw,
            BLOCK_O=BO, BLOCK_I=BI, BLOCK_R=BR,
        )
    if grad_b is not None:
        grad_b.add_((coef @ G.float().sum(1)).to(grad_b.dtype))


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
        a, b = (g2.t(), x2) if layout == "out_in" else (x2.t(), g2)
        if grad_w.dtype == g2.dtype:
            grad_w.addmm_(a, b, beta=0 if overwrite else 1)  # beta=0 ignores grad_w's (uninitialised) values
        elif overwrite:
            grad_w.copy_(torch.mm(a, b))
        else:
            grad_w.add_(torch.mm(a, b))
    if grad_b is not None:
        gsum = g2.sum(0, dtype=torch.float32) if scale_g else coef.float() @ G.sum(1, dtype=torch.float32)
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
    if G.device.type == "cuda" and _HAS_TRITON:
        _dp_clip_accumulate_triton(G, X, coef, grad_w, grad_b, layout, overwrite)
    else:
        _dp_clip_accumulate_torch(G, X, coef, grad_w, grad_b, layout, overwrite)
