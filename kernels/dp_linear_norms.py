"""Per-sample squared norms of a Linear layer's weight(+bias) gradient, without storing per-sample tiles.

For sample ``b`` with output gradient ``G_b`` (T×out) and input ``X_b`` (T×in) the weight gradient is
``G_bᵀ X_b`` (out×in) and the bias gradient ``Σ_t G_b[t]`` (out). Two exact forms of its squared norm:

- direct: ``‖G_bᵀ X_b‖²`` computed tile by tile; each (out-tile, in-tile) of the product is squared and
  summed in registers, then added to ``norms[b]``; costs ``2·T·in·out`` flops per sample;
- ghost (Li et al. 2022, "Large language models can be strong differentially private learners"):
  ``⟨G_b G_bᵀ, X_b X_bᵀ⟩`` from two T×T Gram matrices; costs ``2·T²·(in+out)`` flops per sample, so
  it is cheaper when ``T·(in+out) < in·out`` (the usual statement is ``2T² < in·out``).

Backends and their precision (the result is fp32 in every case):

- CUDA, direct: the Triton kernel. Products are exact and accumulate in fp32: fp32 inputs use
  ``input_precision="ieee"`` (Triton's default would be TF32, a 10-bit mantissa: ~1e-3 relative
  error), bf16/fp16 inputs run on tensor cores with fp32 accumulation. Tiles (up to 128×128×64) are
  autotuned on the first launch per layer shape. Each program writes its tile's sum to a slot of its
  own and torch sums the slots of a sample in a fixed order (no atomics), so a shape gives the same bits
  on every run on one GPU (the autotuner's choice of tile, made once per process, fixes the slots).
- CUDA, ghost: cuBLAS (``torch.bmm``) Gram matrices in fp32: 16-bit inputs accumulate and are written
  in fp32 (``out_dtype``) where torch offers it, else the Grams are rounded to the input dtype
  (2⁻⁸ relative for bf16); fp32 inputs follow torch's matmul precision setting, IEEE fp32 by default
  (``torch.set_float32_matmul_precision("high")`` switches it to TF32, as for ``nn.Linear``). The
  Triton ghost kernel (exact fp32 products, symmetric tiles only) stays available as
  ``_dp_linear_norms_triton(..., "ghost")`` for comparison in the benchmark.
- CPU: torch (oneDNN/MKL) in fp32, inputs upcast to fp32.

Inputs are read once per tile; nothing of size B×out×in is written (the torch direct form materialises
a cache-sized chunk of samples at a time). Offsets are int64 and the grid is one axis (B·tiles
programs), so an LM head of any batch fits CUDA's limits; see :mod:`memtrain.kernels._launch`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from memtrain.kernels._launch import checked_grid, interpreting, on_device_of, require_triton_device

try:  # Triton is a Linux x86-64 dependency only; the torch path must work without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - platform without Triton
    _HAS_TRITON = False

__all__ = ["Gram", "dp_linear_norms", "ghost_is_cheaper", "gram"]

if _HAS_TRITON:
    from memtrain.kernels._common import _dot_operand, _sample_offset, _tile_offsets

    @triton.jit
    def _dp_linear_norms_direct_kernel(
        g_ptr, x_ptr, out_ptr, T, D_OUT, D_IN,
        stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi, SLOTS,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # grid: (B · n_o · n_i,) on axis 0 (2³¹-1 programs); a sample's tiles are adjacent, so programs running
        # together read the same G_b and X_b from L2.
        pid = tl.program_id(0)
        n_i = tl.cdiv(D_IN, BLOCK_I)
        n_tiles = tl.cdiv(D_OUT, BLOCK_O) * n_i
        b = pid // n_tiles
        tile = pid % n_tiles
        offs_o = (tile // n_i) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = (tile % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        g_b = g_ptr + _sample_offset(b, stride_gb)
        x_b = x_ptr + _sample_offset(b, stride_xb)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            gt = tl.load(g_b + _tile_offsets(offs_o, stride_go, offs_t, stride_gt),
                         mask=(offs_o[:, None] < D_OUT) & (offs_t[None, :] < T), other=0.0)
            x = tl.load(x_b + _tile_offsets(offs_t, stride_xt, offs_i, stride_xi),
                        mask=(offs_t[:, None] < T) & (offs_i[None, :] < D_IN), other=0.0)
            acc = tl.dot(_dot_operand(gt), _dot_operand(x), acc, input_precision="ieee")
        # one slot per (sample, tile), summed by the launcher in a fixed order: deterministic, unlike an atomic add
        tl.store(out_ptr + b.to(tl.int64) * SLOTS + tile, tl.sum(acc * acc))

    @triton.jit
    def _gram_tile(ptr, offs_t, offs_s, T, D, k_end, stride_t, stride_k,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile (offs_t, offs_s) of A Aᵀ for A = ptr (T×D), summing over k < k_end (0 skips the work)."""
        acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(ptr + _tile_offsets(offs_t, stride_t, offs_k, stride_k),
                        mask=(offs_t[:, None] < T) & (offs_k[None, :] < D), other=0.0)
            c = tl.load(ptr + _tile_offsets(offs_k, stride_k, offs_s, stride_t),
                        mask=(offs_k[:, None] < D) & (offs_s[None, :] < T), other=0.0)
            acc = tl.dot(_dot_operand(a), _dot_operand(c), acc, input_precision="ieee")
        return acc

    @triton.jit
    def _dp_linear_norms_ghost_kernel(
        g_ptr, x_ptr, out_ptr, T, D_OUT, D_IN,
        stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi, SLOTS,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # grid: (B · n_t²,) on axis 0. Both Grams are symmetric: tiles above the diagonal count twice, tiles
        # below it skip their loops (k_end = 0) and add nothing.
        pid = tl.program_id(0)
        n_t = tl.cdiv(T, BLOCK_T)
        b = pid // (n_t * n_t)
        tile = pid % (n_t * n_t)
        pt = tile // n_t
        ps = tile % n_t
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_s = ps * BLOCK_T + tl.arange(0, BLOCK_T)
        lower = pt > ps
        gg = _gram_tile(g_ptr + _sample_offset(b, stride_gb), offs_t, offs_s, T, D_OUT,
                        tl.where(lower, 0, D_OUT), stride_gt, stride_go, BLOCK_T, BLOCK_K)
        xx = _gram_tile(x_ptr + _sample_offset(b, stride_xb), offs_t, offs_s, T, D_IN,
                        tl.where(lower, 0, D_IN), stride_xt, stride_xi, BLOCK_T, BLOCK_K)
        weight = tl.where(pt < ps, 2.0, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * SLOTS + tile, weight * tl.sum(gg * xx))  # a slot each, as above


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


def direct_grid(B: int, d_out: int, d_in: int, block_o: int, block_i: int) -> tuple[int]:
    """The direct kernel's grid, ``(B · n_o · n_i,)``, checked against CUDA's limits."""
    n = B * -(-d_out // block_o) * -(-d_in // block_i)
    return checked_grid((n,), "dp_linear_norms", f"direct form, B={B}, {d_out}x{d_in} in {block_o}x{block_i} tiles")


def ghost_grid(B: int, T: int, block_t: int) -> tuple[int]:
    """The Triton ghost kernel's grid, ``(B · n_t²,)``, checked against CUDA's limits."""
    n_t = -(-T // block_t)
    return checked_grid((B * n_t * n_t,), "dp_linear_norms", f"ghost form, B={B}, T={T} in {block_t}-row tiles")


# Direct-form tiles for the autotuner, computed on the first launch (never at import): tensor-core tiles
# for 16-bit inputs, smaller FMA tiles for exact fp32 (no tensor cores for IEEE fp32 products).
_DIRECT_16BIT = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 64, 64, 4, 4)]
_DIRECT_FP32 = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 16, 8, 2),
                (32, 32, 32, 4, 2)]
# The interpreter runs one small tile (tests stay fast); tests pass larger ones explicitly.
_INTERPRETER_DIRECT = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_T": 16}
_INTERPRETER_GHOST = {"BLOCK_T": 16, "BLOCK_K": 32}
_CUDA_GHOST = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


@functools.cache
def _autotuned_direct(sixteen_bit: bool):
    tiles = _DIRECT_16BIT if sixteen_bit else _DIRECT_FP32
    configs = [triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t}, num_warps=w, num_stages=s)
               for o, i, t, w, s in tiles]
    # Configurations fill different slots: the autotuner zeroes them before each run and before the final one.
    return triton.autotune(configs=configs, key=["D_OUT", "D_IN"], reset_to_zero=["out_ptr"])(
        _dp_linear_norms_direct_kernel)


def _common_dtype(G: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    if G.dtype == X.dtype:
        return G, X
    dtype = torch.promote_types(G.dtype, X.dtype)
    return G.to(dtype), X.to(dtype)


def _bias_sq_norms(G: Tensor) -> Tensor:
    return G.sum(1, dtype=torch.float64 if G.dtype == torch.float64 else torch.float32).square().sum(1)


def _dp_linear_norms_triton(G: Tensor, X: Tensor, with_bias: bool, method: str,
                            config: dict | None = None) -> Tensor:
    """Triton kernels; ``config`` (BLOCK_* and optionally num_warps/num_stages) bypasses autotuning."""
    B, T, d_in, d_out = _check(G, X)
    require_triton_device("dp_linear_norms", G, X)
    G, X = _common_dtype(G, X)
    if B == 0 or T == 0:
        return torch.zeros(B, device=G.device, dtype=torch.float32)
    slots = _slots(method, config, T, d_in, d_out, G.dtype)
    partial = torch.zeros(B, slots, device=G.device, dtype=torch.float32)
    args = (G, X, partial, T, d_out, d_in, *G.stride(), *X.stride(), slots)
    with on_device_of(G):
        _launch_norms(args, method, config, B, T, d_in, d_out, G.dtype)
    out = partial.sum(1)  # a fixed order: the same bits on every run
    if with_bias:
        out += _bias_sq_norms(G)
    return out


def _slots(method: str, config: dict | None, T: int, d_in: int, d_out: int, dtype: torch.dtype) -> int:
    """Per-sample partial-sum slots: one per tile of the tiling launched, or of the finest tiling the autotuner
    may choose (its unused slots stay zero)."""
    if method == "ghost":
        config = config or (_INTERPRETER_GHOST if interpreting() else _CUDA_GHOST)
        return (-(-T // config["BLOCK_T"])) ** 2
    if config is None and interpreting():
        config = _INTERPRETER_DIRECT
    tiles = [(config["BLOCK_O"], config["BLOCK_I"])] if config is not None else [
        (o, i) for o, i, *_ in (_DIRECT_16BIT if dtype in (torch.bfloat16, torch.float16) else _DIRECT_FP32)]
    return max(-(-d_out // o) * -(-d_in // i) for o, i in tiles)


def _launch_norms(args: tuple, method: str, config: dict | None, B: int, T: int, d_in: int, d_out: int,
                  dtype: torch.dtype) -> None:
    """The norm kernel's launch (under the tensors' device: :func:`_dp_linear_norms_triton`)."""
    if method == "direct":
        if config is None and interpreting():
            config = _INTERPRETER_DIRECT
        if config is not None:
            _dp_linear_norms_direct_kernel[direct_grid(B, d_out, d_in, config["BLOCK_O"], config["BLOCK_I"])](
                *args, **config, enable_fp_fusion=True)
        else:
            kernel = _autotuned_direct(dtype in (torch.bfloat16, torch.float16))
            kernel[lambda m: direct_grid(B, d_out, d_in, m["BLOCK_O"], m["BLOCK_I"])](*args, enable_fp_fusion=True)
    elif method == "ghost":
        config = config or (_INTERPRETER_GHOST if interpreting() else _CUDA_GHOST)
        _dp_linear_norms_ghost_kernel[ghost_grid(B, T, config["BLOCK_T"])](*args, **config, enable_fp_fusion=True)
    else:
        raise ValueError(f"dp_linear_norms: unknown method {method!r}; use 'direct' or 'ghost'")


def _chunk(per_sample_bytes: int, budget: int = 32 << 20) -> int:
    return max(1, budget // max(per_sample_bytes, 1))


@functools.cache
def _has_out_dtype() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=)`` (16-bit operands, fp32 accumulation and output)."""
    return hasattr(torch.ops.aten.bmm, "dtype")


def _bmm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batched) in fp32: 16-bit CUDA operands stay 16-bit on tensor cores with an fp32 result."""
    if a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16) and _has_out_dtype():
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


# Gram matrices are symmetric, so only the block lower triangle is computed: column blocks of width
# `_gram_block_width(T)`, each one product of the rows from the block down (B, T - j, w) with the block's
# rows. torch exposes no batched syrk; these few large products are what it can call. Against one full bmm
# per Gram (2-core CPU, MKL; bench/RESULTS.md): 0.83-0.86 of the time at T = 128 (two blocks), 0.76 at
# T = 256 and 0.68 at T = 512 (four and eight blocks); below T = 96 one product is used.
_GRAM_BLOCK_MIN_T = 96


def _gram_block_width(T: int) -> int:
    """Column-block width: T itself below 96 rows, else 64 rows or T/8 rounded up to 16, whichever is wider."""
    if T < _GRAM_BLOCK_MIN_T:
        return max(T, 1)
    return max(64, -(-T // 128) * 16)


class Gram:
    """The block lower triangle of the per-sample Gram matrices A_b A_bᵀ, fp32.

    ``blocks[k]`` is ``A[:, j:] @ A[:, j:j+w]ᵀ`` (B, T - j, w) for ``j = k·width`` (``w = width``, less for the
    last block when ``width`` does not divide T): its first ``w`` rows are the square diagonal block (counted
    once), the rows below it stand for themselves and their mirror image above the diagonal (counted twice).
    """

    def __init__(self, blocks: list[Tensor], width: int):
        self.blocks, self.width = blocks, width

    def samples(self, start: int, stop: int) -> Gram:
        """The Grams of samples [start, stop)."""
        return Gram([b[start:stop] for b in self.blocks], self.width)

    def inner(self, other: Gram, *, overwrite: bool = False) -> Tensor:
        """(B,) fp32 ``⟨self_b, other_b⟩`` over the whole T×T matrices; ``overwrite`` reuses self's blocks."""
        if other.width != self.width or len(other.blocks) != len(self.blocks):
            raise ValueError("Gram.inner: the two Grams are blocked differently (different T)")
        out = None
        for a, b in zip(self.blocks, other.blocks, strict=True):
            prod = a.mul_(b) if overwrite else a * b
            w = prod.shape[2]  # the diagonal block is square: as many rows as the block has columns
            part = prod[:, :w].sum((1, 2))
            if prod.shape[1] > w:
                part = part + 2 * prod[:, w:].sum((1, 2))
            out = part if out is None else out + part
        return out

    def full(self) -> Tensor:
        """The whole (B, T, T) matrices, mirrored from the blocks (to check them against a reference)."""
        B, T = self.blocks[0].shape[0], self.blocks[0].shape[1]
        out = self.blocks[0].new_empty(B, T, T)
        for k, blk in enumerate(self.blocks):
            j = k * self.width
            w = blk.shape[2]
            out[:, j:, j:j + w] = blk
            out[:, j:j + w, j:] = blk.transpose(1, 2)
        return out


def gram(X: Tensor) -> Gram:
    """Per-sample Gram matrices X_b X_bᵀ (block lower triangle, fp32), to share between layers reading X."""
    T = X.shape[1]
    w = _gram_block_width(T)
    return Gram([_bmm_fp32(X[:, j:], X[:, j:j + w].transpose(1, 2)) for j in range(0, T, w)], w)


def _dp_linear_norms_torch(G: Tensor, X: Tensor, with_bias: bool, method: str, x_gram: Gram | None = None) -> Tensor:
    B, T, d_in, d_out = _check(G, X)
    if method not in ("ghost", "direct"):
        raise ValueError(f"dp_linear_norms: unknown method {method!r}; use 'direct' or 'ghost'")
    out = torch.empty(B, device=G.device, dtype=torch.float32)
    if B == 0 or T == 0:
        return out.zero_()
    if method == "ghost":
        # The two Gram matrices of a chunk are the only temporaries (chunk·T²·4 bytes each, at most).
        step = _chunk(2 * T * T * 4)
        for s in range(0, B, step):
            xx = x_gram.samples(s, s + step) if x_gram is not None else gram(X[s:s + step])
            out[s:s + step] = gram(G[s:s + step]).inner(xx, overwrite=True)
    else:
        step = _chunk(d_in * d_out * 4)
        for s in range(0, B, step):
            p = _bmm_fp32(G[s:s + step].transpose(1, 2), X[s:s + step])
            # row norms, then a pairwise sum: one fp32 vector_norm over out·in elements drifts (~3e-4 at 4M)
            out[s:s + step] = torch.linalg.vector_norm(p, dim=2).square().sum(1)
    if with_bias:
        out += _bias_sq_norms(G)
    return out


def dp_linear_norms(G: Tensor, X: Tensor, *, with_bias: bool = False, method: str | None = None,
                    x_gram: Gram | None = None) -> Tensor:
    """Per-sample squared norms of a Linear layer's weight (and bias) gradient.

    Args:
        G: output gradient, (B, T, out).
        X: layer input, (B, T, in).
        with_bias: add ``‖Σ_t G_b[t]‖²``, the bias gradient's squared norm.
        method: ``"direct"`` or ``"ghost"``; by default the one with fewer flops.
        x_gram: optional precomputed ``gram(X)`` for the ghost form (torch/cuBLAS path).

    Returns:
        (B,) float32 tensor of ``‖G_bᵀ X_b‖² (+ ‖Σ_t G_b[t]‖²)``.
    """
    if method is None:
        method = "ghost" if ghost_is_cheaper(G.shape[1], X.shape[-1], G.shape[-1]) else "direct"
    if G.device.type == "cuda" and _HAS_TRITON and method == "direct":
        return _dp_linear_norms_triton(G, X, with_bias, method)
    return _dp_linear_norms_torch(G, X, with_bias, method, x_gram)
