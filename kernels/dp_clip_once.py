"""FlashDP's "compute once": each sample's gradient tile is computed once, its norm taken, and the tile
accumulated with its clip factor, in a single pass.

Per-layer clipping needs only the sample's own norm within the layer, so the clipped sum can be formed
without recomputing ``G_bᵀ X_b``:

- CPU (``_dp_clip_once_torch``): samples in chunks small enough to stay in cache (≈32 MiB of
  per-sample gradients); per chunk one ``bmm`` gives ``P = G_cᵀ X_c`` (chunk×out×in), then
  ``‖P_b‖``, the clip factors, and ``grad_w += coefᵀ P`` (a GEMV over the chunk). Flops equal the
  non-DP weight GEMM; the two extra passes over P hit cache.
- CUDA (``_dp_clip_once_cuda``): ``csrc/dp_clip.cu``, a cooperative kernel whose blocks own output
  tiles; for each sample a block computes its tile, the per-sample norm is reduced across the grid
  (``grid.sync()``), and the scaled tile is added to a register accumulator. Only for layers whose
  tiles fit co-resident; compiled at run time by torch's extension loader.

Both return the per-sample squared norms (fp32, raw: before ``scale``).
"""

from __future__ import annotations

import functools
import pathlib
import warnings

import torch
from torch import Tensor

from .dp_clip_accumulate import clip_factors

__all__ = ["cuda_once_fits", "dp_clip_once_"]

_CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "dp_clip.cu"

# Tile of the cooperative kernel (csrc/dp_clip.cu: DP_TILE_O × DP_TILE_I outputs per block).
_TILE_O = 32
_TILE_I = 32
_warned: list[bool] = []


def _chunk(per_sample_bytes: int, budget: int = 32 << 20) -> int:
    return max(1, budget // max(per_sample_bytes, 1))


def _dp_clip_once_torch(G: Tensor, X: Tensor, grad_w: Tensor | None, grad_b: Tensor | None, max_norm: float,
                        scale: float, layout: str = "out_in") -> Tensor:
    B, _, d_out = G.shape
    d_in = X.shape[2]
    sq = torch.zeros(B, dtype=torch.float32, device=G.device)
    step = _chunk(d_in * d_out * G.element_size())
    for s in range(0, B, step):
        g = G[s:s + step]
        x = X[s:s + step]
        p = torch.bmm(g.transpose(1, 2), x) if layout == "out_in" else torch.bmm(x.transpose(1, 2), g)
        pf = p.flatten(1)
        sq_c = torch.linalg.vector_norm(pf, dim=1, dtype=torch.float32).square()
        gb = g.sum(1, dtype=torch.float32) if grad_b is not None else None
        if gb is not None:
            sq_c += gb.square().sum(1)
        coef = clip_factors(sq_c, max_norm, scale)
        if grad_w is not None:
            upd = torch.mv(pf.t(), coef.to(pf.dtype))
            grad_w.add_(upd.view_as(grad_w))
        if grad_b is not None:
            grad_b.add_((coef @ gb).to(grad_b.dtype))
        sq[s:s + step] = sq_c
    return sq


@functools.cache
def _load_cuda():  # pragma: no cover - needs CUDA
    from torch.utils.cpp_extension import load_inline

    if not _CSRC.exists():
        raise RuntimeError(
            f"dp_clip_once: CUDA source {_CSRC} not found (csrc/ is not shipped in a non-editable install); "
            "install memtrain from a checkout with `pip install -e .`, or force the two-pass path with "
            "FLASHDP_PATH=ghost"
        )
    cpp = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
extern "C" int dp_clip_once_launch(const float* g, const float* x, float* grad_w, float* sq_out,
                                   int B, int T, int d_out, int d_in, float max_norm, float scale,
                                   void* stream);
torch::Tensor dp_clip_once(torch::Tensor g, torch::Tensor x, torch::Tensor grad_w, double max_norm, double scale) {
  TORCH_CHECK(g.is_cuda() && x.is_cuda() && grad_w.is_cuda(), "dp_clip_once: tensors must be on CUDA");
  TORCH_CHECK(g.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat &&
              grad_w.scalar_type() == torch::kFloat, "dp_clip_once: fp32 tensors only");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && grad_w.is_contiguous(), "dp_clip_once: contiguous only");
  auto sq = torch::zeros({g.size(0)}, g.options());
  int rc = dp_clip_once_launch(g.data_ptr<float>(), x.data_ptr<float>(), grad_w.data_ptr<float>(),
                               sq.data_ptr<float>(), g.size(0), g.size(1), g.size(2), x.size(2),
                               (float)max_norm, (float)scale, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc == 0, "dp_clip_once: cooperative launch failed (code ", rc, "); the layer's tiles do not fit "
              "co-resident: use the two-pass path");
  return sq;
}
"""
    return load_inline(
        name="memtrain_dp_clip",
        cpp_sources=[cpp],
        cuda_sources=[_CSRC.read_text()],
        functions=["dp_clip_once"],
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def cuda_once_fits(d_out: int, d_in: int, device: torch.device | None = None) -> bool:
    """Whether a layer's output tiles fit co-resident for the cooperative kernel (one block per tile)."""
    if not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(device)
    tiles = -(-d_out // _TILE_O) * -(-d_in // _TILE_I)
    # 256 threads per block, a few KiB of shared memory: conservatively 2 resident blocks per SM.
    return tiles <= 2 * props.multi_processor_count


def _dp_clip_once_cuda(G: Tensor, X: Tensor, grad_w: Tensor, grad_b: Tensor | None, max_norm: float,
                       scale: float) -> Tensor:  # pragma: no cover - needs CUDA
    mod = _load_cuda()
    g = G.float().contiguous()
    x = X.float().contiguous()
    if grad_b is not None:
        raise ValueError("dp_clip_once_: the CUDA kernel handles weight-only layers; use the two-pass path")
    return mod.dp_clip_once(g, x, grad_w, float(max_norm), float(scale))


def dp_clip_once_(G: Tensor, X: Tensor, grad_w: Tensor | None, grad_b: Tensor | None, max_norm: float,
                  scale: float = 1.0, *, layout: str = "out_in") -> Tensor:
    """Clip each sample's Linear gradient once-computed and add the clipped sum to the gradients in place.

    Args:
        G: output gradient, (B, T, out).
        X: layer input, (B, T, in).
        grad_w: (out, in) (``layout="out_in"``) or (in, out) (``"in_out"``), or None.
        grad_b: (out,) or None.
        max_norm: the layer's threshold C_l.
        scale: loss-reduction scale: sample b's gradient is ``scale · G_bᵀX_b``.

    Returns:
        (B,) fp32 raw squared norms ``‖G_bᵀX_b‖² (+ bias)``.
    """
    if (G.device.type == "cuda" and grad_w is not None and grad_b is None and layout == "out_in"
            and grad_w.dtype == torch.float32 and grad_w.is_contiguous()
            and cuda_once_fits(G.shape[2], X.shape[2], G.device)):  # pragma: no cover - needs CUDA
        try:
            return _dp_clip_once_cuda(G, X, grad_w, grad_b, max_norm, scale)
        except RuntimeError as exc:  # not compilable here, or the tiles do not fit: same result, chunked path
            if not _warned:
                _warned.append(True)
                warnings.warn(f"dp_clip_once_: the cooperative CUDA kernel is unavailable ({exc}); using the "
                              "chunked torch path", RuntimeWarning, stacklevel=2)
    return _dp_clip_once_torch(G, X, grad_w, grad_b, max_norm, scale, layout)
