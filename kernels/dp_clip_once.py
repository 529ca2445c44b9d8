"""FlashDP's "compute once": each sample's gradient tile is computed once, its norm taken, and the tile
accumulated with its clip factor, in a single pass.

Per-layer clipping needs only the sample's own norm within the layer, so the clipped sum can be formed
without recomputing ``G_bᵀ X_b``:

- CPU (``_dp_clip_once_torch``): samples in chunks small enough to stay in cache (≈32 MiB of
  per-sample gradients); per chunk one ``bmm`` gives ``P = G_cᵀ X_c`` (chunk×out×in), then
  ``‖P_b‖``, the clip factors, and ``grad_w += coefᵀ P`` (a GEMV over the chunk). Flops equal the
  non-DP weight GEMM; the two extra passes over P hit cache. Precision: P in the inputs' dtype (fp32
  BLAS for fp32; for bf16, P, the factors and the GEMV are rounded to bf16, 2⁻⁸ relative), norms
  summed in fp32 row by row. The CUDA dispatcher sends the layers the kernel below does not serve here
  too (cuBLAS).
- CUDA (``_dp_clip_once_cuda``): ``csrc/dp_clip.cu``, a cooperative kernel whose blocks own output
  tiles; for each sample a block computes its tile, the per-sample norm is reduced across the grid
  (``grid.sync()``), and the scaled tile is added to a register accumulator. fp32 FMA arithmetic
  (IEEE fp32, no TF32). It serves fp32, bias-free, ``(out, in)``-layout layers whose tiles fit
  co-resident (:func:`cuda_once_reason` says why a layer is not served). It is compiled by torch's
  extension loader in :func:`prepare`, which flashdp calls when a model is made private, never inside
  a backward pass; a failed build is remembered (:func:`cuda_once_status`) and not retried.

Both return the per-sample squared norms (fp32, raw: before ``scale``).
"""

from __future__ import annotations

import pathlib
import threading
import time
import warnings
from types import ModuleType

import torch
from torch import Tensor

from .dp_clip_accumulate import accum_dtype, clip_factors

__all__ = ["clear_stale_lock", "cuda_once_fits", "cuda_once_reason", "cuda_once_status", "dp_clip_once_",
           "extension_build_dir", "prepare"]

_CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = (_CSRC / "dp_clip_binding.cpp", _CSRC / "dp_clip.cu")

# Tile of the cooperative kernel (csrc/dp_clip.cu: DP_TILE_O × DP_TILE_I outputs per block).
_TILE_O = 32
_TILE_I = 32
_warned: list[bool] = []
_EXT_NAME = "memtrain_dp_clip"
# torch's extension loader holds ``<build dir>/lock`` (a FileBaton) while it compiles and waits, without end,
# for another holder to remove it; a build killed meanwhile leaves it behind. The build takes a minute or so,
# so a lock older than this is stale.
STALE_LOCK_S = 600


def extension_build_dir() -> pathlib.Path:
    """Where torch's extension loader builds the kernel (created if missing): ``$TORCH_EXTENSIONS_DIR`` (or
    torch's per-Python, per-CUDA default root) / the extension's name, as ``load()`` itself chooses it."""
    from torch.utils.cpp_extension import _get_build_directory  # private, unchanged since torch 1.x

    return pathlib.Path(_get_build_directory(_EXT_NAME, verbose=False))


def clear_stale_lock(build_dir: pathlib.Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s`` (0: whatever its age, for a caller that
    knows the builder is dead); True when a lock was removed."""
    lock = pathlib.Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    warnings.warn(f"dp_clip_once: removed {lock}, a lock {age:.0f} s old left by an interrupted build of the "
                  "CUDA kernel (torch's extension loader would wait for it forever)", RuntimeWarning, stacklevel=2)
    return True


class _CudaKernel:
    """The compiled extension, or the reason it is unavailable; built at most once per process."""

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def build(self) -> None:
        with self._lock:
            if self.module is not None or self.error is not None:
                return
            missing = [str(p) for p in _SOURCES if not p.exists()]
            if missing:
                self.error = (f"CUDA sources not found ({', '.join(missing)}: csrc/ is not shipped in this "
                              "install); install memtrain from a checkout with `pip install -e .`")
                return
            try:
                from torch.utils.cpp_extension import is_ninja_available, load

                if not is_ninja_available():
                    self.error = ("ninja is not installed (torch's extension loader builds with it); "
                                  "`pip install ninja`, a requirement of memtrain")
                    return
                build_dir = extension_build_dir()
                clear_stale_lock(build_dir)
                self.module = load(name=_EXT_NAME, sources=[str(p) for p in _SOURCES], extra_cuda_cflags=["-O3"],
                                   build_directory=str(build_dir), verbose=False)
            except Exception as exc:  # OSError (no CUDA_HOME), ImportError (bad .so), RuntimeError (compiler) ...
                self.error = f"{type(exc).__name__}: {exc}".strip()


_KERNEL = _CudaKernel()


def prepare(device: torch.device | str | int | None = None) -> bool:
    """Compile (or load from torch's extension cache) the cooperative CUDA kernel now, outside any backward.

    Call once before training (a model made private by flashdp does, in its first grad-enabled forward on
    the device). The first call on a machine compiles for a minute or so; a failure is remembered, warned
    about once, and never retried in this process.

    Args:
        device: the CUDA device the kernel will run on (default: the current one).

    Returns:
        Whether the kernel can run on ``device``; :func:`cuda_once_status` says why not.
    """
    if not torch.cuda.is_available():
        return False
    _KERNEL.build()
    if _KERNEL.module is None:
        if not _warned:
            _warned.append(True)
            warnings.warn(f"dp_clip_once: the cooperative CUDA kernel is unavailable ({_KERNEL.error}); layers "
                          "use the two-pass path", RuntimeWarning, stacklevel=2)
        return False
    index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    # one tile: whether this device launches cooperative kernels at all (per-layer fits: cuda_once_reason)
    return _KERNEL.module.dp_clip_once_refusal(
        torch.cuda.current_device() if index.index is None else index.index, _TILE_O, _TILE_I) == ""


def cuda_once_status() -> str:
    """One line for the environment report: whether the cooperative CUDA kernel is ready, and if not, why."""
    if not torch.cuda.is_available():
        return "unavailable: no CUDA device"
    if _KERNEL.module is not None:
        return "ready"
    if _KERNEL.error is not None:
        return f"unavailable: build failed ({_KERNEL.error})"
    return "not built: call memtrain.kernels.dp_clip_once.prepare(device) before the first backward"


def cuda_once_reason(d_out: int, d_in: int, device: torch.device | None = None, *, dtype: torch.dtype = torch.float32,
                     has_bias: bool = False, layout: str = "out_in") -> str | None:
    """Why the cooperative CUDA kernel cannot clip this layer, or None when it can.

    Args:
        d_out, d_in: the weight's shape.
        device: the CUDA device (default: the current one).
        dtype: dtype of the layer's output gradient and input (the kernel reads fp32).
        has_bias: whether the layer's bias is clipped with its weight (the kernel clips weights only).
        layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2 Conv1D; the kernel writes (out, in)).
    """
    if has_bias:
        return "the kernel clips weight-only layers; this one has a bias"
    if dtype != torch.float32:
        return f"the kernel reads fp32 gradients; this layer's are {dtype}"
    if layout != "out_in":
        return f"the kernel writes nn.Linear's (out, in) weight layout; this layer's is {layout!r}"
    status = cuda_once_status()
    if status != "ready":
        return status
    props = torch.cuda.get_device_properties(device)
    tiles = -(-d_out // _TILE_O) * -(-d_in // _TILE_I)
    # 256 threads per block, a few KiB of shared memory: conservatively 2 resident blocks per SM.
    if tiles > 2 * props.multi_processor_count:
        return (f"{tiles} output tiles of {_TILE_O}x{_TILE_I} exceed the {2 * props.multi_processor_count} that "
                f"stay co-resident on {props.name}")
    return None


def cuda_once_fits(d_out: int, d_in: int, device: torch.device | None = None, *, dtype: torch.dtype = torch.float32,
                   has_bias: bool = False, layout: str = "out_in") -> bool:
    """Whether the cooperative CUDA kernel clips this layer (see :func:`cuda_once_reason` for the reason why not).

    False until :func:`prepare` has built the kernel: a backward pass never compiles it.
    """
    return cuda_once_reason(d_out, d_in, device, dtype=dtype, has_bias=has_bias, layout=layout) is None


def _chunk(per_sample_bytes: int, budget: int = 32 << 20) -> int:
    return max(1, budget // max(per_sample_bytes, 1))


def _dp_clip_once_torch(G: Tensor, X: Tensor, grad_w: Tensor | None, grad_b: Tensor | None, max_norm: float,
                        scale: float, layout: str = "out_in", budget: int = 32 << 20) -> Tensor:
    """Chunks of samples whose per-sample gradients (chunk × out × in) fit ``budget`` bytes."""
    B, _, d_out = G.shape
    d_in = X.shape[2]
    acc = accum_dtype(G.dtype)  # float64 inputs keep float64 norms and sums (fp32 norms of a double tensor raise)
    sq = torch.zeros(B, dtype=acc, device=G.device)
    step = _chunk(d_in * d_out * G.element_size(), budget)
    for s in range(0, B, step):
        g = G[s:s + step]
        x = X[s:s + step]
        p = torch.bmm(g.transpose(1, 2), x) if layout == "out_in" else torch.bmm(x.transpose(1, 2), g)
        pf = p.flatten(1)
        # Norms of rows, then a (pairwise) sum of their squares: torch's fp32 vector_norm over a whole
        # 2048x2048 sample drifts by ~3e-4 relative on CPU; over rows it stays within ~1e-7.
        sq_c = torch.linalg.vector_norm(p, dim=2, dtype=acc).square().sum(1)
        gb = g.sum(1, dtype=acc) if grad_b is not None else None
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


def _dp_clip_once_cuda(G: Tensor, X: Tensor, grad_w: Tensor, grad_b: Tensor | None, max_norm: float,
                       scale: float) -> Tensor:  # pragma: no cover - needs CUDA
    if grad_b is not None:
        raise ValueError("dp_clip_once_: the CUDA kernel handles weight-only layers; use the two-pass path")
    _KERNEL.build()
    if _KERNEL.module is None:
        raise RuntimeError(f"dp_clip_once_: the cooperative CUDA kernel is unavailable ({_KERNEL.error})")
    return _KERNEL.module.dp_clip_once(G.float().contiguous(), X.float().contiguous(), grad_w, float(max_norm),
                                       float(scale))


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
        (B,) raw squared norms ``‖G_bᵀX_b‖² (+ bias)``, fp32 (fp64 for float64 inputs).
    """
    if (G.device.type == "cuda" and grad_w is not None and grad_w.dtype == torch.float32 and grad_w.is_contiguous()
            and X.dtype == G.dtype
            and cuda_once_fits(G.shape[2], X.shape[2], G.device, dtype=G.dtype, has_bias=grad_b is not None,
                               layout=layout)):  # pragma: no cover - needs CUDA
        try:
            return _dp_clip_once_cuda(G, X, grad_w, grad_b, max_norm, scale)
        except RuntimeError as exc:  # the launch was refused (its CUDA error is cleared): same result, chunked path
            if not _warned:
                _warned.append(True)
                warnings.warn(f"dp_clip_once_: the cooperative CUDA kernel did not run ({exc}); using the "
                              "chunked torch path", RuntimeWarning, stacklevel=2)
    return _dp_clip_once_torch(G, X, grad_w, grad_b, max_norm, scale, layout)
