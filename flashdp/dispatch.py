"""Which kernel path clips a Linear-like layer, per device and shape; cached; forceable for tests.

Paths (all exact; they differ in cost only):

- ``"once"``: compute each sample's gradient tile once, take its norm, accumulate it scaled
  (``memtrain.kernels.dp_clip_once``). Flops equal the non-DP weight GEMM.
- ``"ghost"``: ghost norms ⟨GGᵀ, XXᵀ⟩ then one row-scaled GEMM (``dp_linear_norms`` + ``dp_clip_accumulate``).
- ``"direct"``: direct norms (tile by tile) then one row-scaled GEMM.

Choice on CPU (measured on the 2-core machine, bench/kernels/bench_dp_clip_once.py, B=32, T=128): ghost
whenever it has fewer flops than the direct form; it beat ``once`` on every transformer shape measured
(512×512: 38 vs 45 ms, 512×1376: 92 vs 121 ms, 512×32000: 1705 vs 4579 ms; the per-sample ``bmm`` with
K=T=128 runs at about half the speed of the one big GEMM). ``once`` otherwise (short-T, small layers).
On CUDA: the cooperative single pass where the layer's tiles fit co-resident, else ghost/direct by flops.

Force a path with ``with flashdp.dispatch.force_path("ghost"): ...`` or ``FLASHDP_PATH=ghost``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from memtrain.kernels.dp_linear_norms import ghost_is_cheaper

__all__ = ["PATHS", "choose_path", "force_path"]

PATHS = ("once", "ghost", "direct")
_forced: list[str] = []


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Force every DP Linear-like layer to use ``path`` (one of PATHS) inside the block; None: automatic."""
    if path is not None and path not in PATHS:
        raise ValueError(f"flashdp.dispatch.force_path: unknown path {path!r}; choose from {PATHS}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


def _forced_path() -> str | None:
    if _forced and _forced[-1] is not None:
        return _forced[-1]
    env = os.environ.get("FLASHDP_PATH")
    if env:
        if env not in PATHS:
            raise ValueError(f"FLASHDP_PATH={env!r} is not one of {PATHS}")
        return env
    return None


@functools.cache
def _auto(device_type: str, T: int, d_in: int, d_out: int, cuda_once: bool) -> str:
    if device_type == "cuda":
        if cuda_once:
            return "once"
        return "ghost" if ghost_is_cheaper(T, d_in, d_out) else "direct"
    return "ghost" if ghost_is_cheaper(T, d_in, d_out) else "once"


def choose_path(device_type: str, T: int, d_in: int, d_out: int, cuda_once: bool = False) -> str:
    """The path for a layer of this shape (forced path first, then the cached automatic choice)."""
    return _forced_path() or _auto(device_type, T, d_in, d_out, cuda_once)
