"""Per-sample squared norms of a Linear layer's weight(+bias) gradient, without storing per-sample tiles.

For sample ``b`` with output gradient ``G_b`` (T×out) and input ``X_b`` (T×in) the weight gradient is
``G_bᵀ X_b`` (out×in) and the bias gradient ``Σ_t G_b[t]`` (out). Two exact forms of its squared norm:

- direct: ``‖G_bᵀ X_b‖²`` computed tile by tile; each (out-tile, in-tile) of the product is squared and
  summed in registers, then added to ``norms[b]``; costs ``2·T·in·out`` flops per sample;
- ghost (Li et al. 2022, "Large language models can be strong differentially private learners"):
  ``⟨G_b G_bᵀ, X_b X_bᵀ⟩`` from two T×T Gram matrices; costs ``2·T²·(in+out)`` flops per sample, so
  it is cheaper when ``T·(in+out) < in·out`` (the usual statement is ``2T² < in·out``).

Inputs are read once per tile; nothing of size B×out×in is written. The result is fp32 whatever the
input dtype (products accumulate in fp32). The bias term is always the direct one (a T-sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is a Linux x86-64 dependency only; the torch path must work without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - platform without Triton
    _HAS_TRITON = False

__all__ = ["dp_linear_norms", "ghost_is_cheaper", "gram"]

if _HAS_TRITON:

    @triton.jit
    def _dp_linear_norms_direct_kernel(
        g_ptr, x_ptr, out_ptr, T, D_OUT, D_IN,
        stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # grid: (B, cdiv(out, BLOCK_O) * cdiv(in, BLOCK_I)); one tile of G_bᵀX_b per program.
        b = tl.program_id(0)
        pid = tl.program_id(1)
        n_i = tl.cdiv(D_IN, BLOCK_I)
        po = pid // n_i
        pi = pid % n_i
        offs_o = po * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            gt = tl.load(
                g_ptr + b * stride_gb + offs_t[None, :] * stride_gt + offs_o[:, None] * stride_go,
                mask=(offs_t[None, :] < T) & (offs_o[:, None] < D_OUT), other=0.0,
            )
            x = tl.load(
                x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
                mask=(offs_t[:, None] < T) & (offs_i[None, :] < D_IN), other=0.0,
            )
            acc += tl.dot(gt.to(tl.float32), x.to(tl.float32))
        tl.atomic_add(out_ptr + b, tl.sum(acc * acc))

    @triton.jit
    def _dp_linear_norms_ghost_kernel(
        g_ptr, x_ptr, out_ptr, T, D_OUT, D_IN,
        stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # grid: (B, cdiv(T, BLOCK_T)²); one (t, s) tile of both Gram matrices per program.
        b = tl.program_id(0)
        pid = tl.program_id(1)
        n_t = tl.cdiv(T, BLOCK_T)
        pt = pid // n_t
        ps = pid % n_t
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_s = ps * BLOCK_T + tl.arange(0, BLOCK_T)
        gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, D_OUT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(g_ptr + b * stride_gb + offs_t[:, None] * stride_gt + offs_k[None, :] * stride_go,
                        mask=(offs_t[:, None] < T) & (offs_k[None, :] < D_OUT), other=0.0)
            c = tl.load(g_ptr + b * stride_gb + offs_s[None, :] * stride_gt + offs_k[:, None] * stride_go,
                        mask=(offs_s[None, :] < T) & (offs_k[:, None] < D_OUT), other=0.0)
            gg += tl.dot(a.to(tl.float32), c.to(tl.float32))
        xx = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + b * stride_xb + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xi,
                        mask=(offs_t[:, None] < T) & (offs_k[None, :] < D_IN), other=0.0)
            c = tl.load(x_ptr + b * stride_xb + offs_s[None, :] * stride_xt + offs_k[:, None] * stride_xi,
                        mask=(offs_s[None, :] < T) & (offs_k[:, None] < D_IN), other=0.0)
            xx += tl.dot(a.to(tl.float32), c.to(tl.float32))
        tl.atomic_add(out_ptr + b, tl.sum(gg * xx))


def ghost_is_cheaper(T: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost form costs fewer flops than the direct one for this shape."""
    return T * (d_in + d_out) < d_in * d_out


def _check(G: Tensor, X: Tensor) -> tuple[int, int, int, int]:
    if G.dim() != 3 or X.dim() != 3 or G.shape[:2] != X.shape[:2]:
        raise ValueError(
            f"dp_linear_norms: expected G (B, T, out) and X (B, T, in) with the same B and T, "
            f"got {tuple(G.shape)} and {tuple(X.shape)}; flatten extra dims into T first"
        )
    if G.device != X.device:
        raise ValueError(f"dp_linear_norms: G on {G.device} but X on {X.device}")
    return G.shape[0], G.shape[1], X.shape[2], G.shape[2]


def _dp_linear_norms_triton(G: Tensor, X: Tensor, with_bias: bool, method: str) -> Tensor:
    B, T, d_in, d_out = _check(G, X)
    out = torch.zeros(B, device=G.device, dtype=torch.float32)
    if B == 0 or T == 0:
        return out
    if method == "direct":
        BO, BI, BT = 32, 32, 16
        grid = (B, triton.cdiv(d_out, BO) * triton.cdiv(d_in, BI))
        _dp_linear_norms_direct_kernel[grid](
            G, X, out, T, d_out, d_in, *G.stride(), *X.stride(), BLOCK_O=BO, BLOCK_I=BI, BLOCK_T=BT,
        )
    elif method == "ghost":
        BT, BK = 16, 32
        grid = (B, triton.cdiv(T, BT) ** 2)
        _dp_linear_norms_ghost_kernel[grid](
            G, X, out, T, d_out, d_in, *G.stride(), *X.stride(), BLOCK_T=BT, BLOCK_K=BK,
        )
    else:
        raise ValueError(f"dp_linear_norms: unknown method {method!r}; use 'direct' or 'ghost'")
    if with_bias:
        out += G.float().sum(1).pow(2).sum(1)
    return out


def _chunk(per_sample_bytes: int, budget: int = 32 << 20) -> int:
    return max(1, budget // max(per_sample_bytes, 1))


def gram(X: Tensor) -> Tensor:
    """(B, T, T) fp32 per-sample Gram matrices X_b X_bᵀ (to share between layers reading the same input)."""
    x = X.float()
    return torch.bmm(x, x.transpose(1, 2))


def _dp_linear_norms_torch(G: Tensor, X: Tensor, with_bias: bool, method: str, x_gram: Tensor | None = None) -> Tensor:
    B, T, d_in, d_out = _check(G, X)
    out = torch.empty(B, device=G.device, dtype=torch.float32)
    if method == "ghost":
        # The two Gram matrices of a chunk are the only temporaries (chunk·T²·4 bytes each).
        step = _chunk(2 * T * T * 4)
        for s in range(0, B, step):
            g = G[s:s + step].float()
            gg = torch.bmm(g, g.transpose(1, 2))
            xx = x_gram[s:s + step] if x_gram is not None else gram(X[s:s + step])
            out[s:s + step] = torch.vdot(gg.reshape(-1), xx.reshape(-1)) if gg.shape[0] == 1 else \
                (gg.mul_(xx)).sum((1, 2))
    elif method == "direct":
        step = _chunk(d_in * d_out * 4)
        for s in range(0, B, step):
            p = torch.bmm(G[s:s + step].float().transpose(1, 2), X[s:s + step].float())
            out[s:s + step] = torch.linalg.vector_norm(p.flatten(1), dim=1).square()
    else:
        raise ValueError(f"dp_linear_norms: unknown method {method!r}; use 'direct' or 'ghost'")
    if with_bias:
        out += G.float().sum(1).pow(2).sum(1)
    return out


def dp_linear_norms(G: Tensor, X: Tensor, *, with_bias: bool = False, method: str | None = None,
                    x_gram: Tensor | None = None) -> Tensor:
    """Per-sample squared norms of a Linear layer's weight (and bias) gradient.

    Args:
        G: output gradient, (B, T, out).
        X: layer input, (B, T, in).
        with_bias: add ``‖Σ_t G_b[t]‖²``, the bias gradient's squared norm.
        method: ``"direct"`` or ``"ghost"``; by default the one with fewer flops.
        x_gram: optional precomputed ``gram(X)`` (B, T, T) for the ghost form (CPU path).

    Returns:
        (B,) float32 tensor of ``‖G_bᵀ X_b‖² (+ ‖Σ_t G_b[t]‖²)``.
    """
    if method is None:
        method = "ghost" if ghost_is_cheaper(G.shape[1], X.shape[-1], G.shape[-1]) else "direct"
    if G.device.type == "cuda" and _HAS_TRITON:
        return _dp_linear_norms_triton(G, X, with_bias, method)
    return _dp_linear_norms_torch(G, X, with_bias, method, x_gram)
