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
On CUDA: the cooperative single pass for the layers it serves (:func:`cuda_once_serves`), else
ghost/direct by flops.

Force a path with ``with flashdp.dispatch.force_path("ghost"): ...`` or ``FLASHDP_PATH=ghost``. The
override is per thread (a context variable); a layer whose forward ran inside the block keeps it for its
backward, also when the backward runs in an autograd worker thread.

Which path each layer takes is logged once per layer and path at DEBUG level on the ``"flashdp"`` logger
(``logging.getLogger("flashdp").setLevel(logging.DEBUG)``); ``python -m memtrain.env_report`` prints the
rules (:func:`describe_rules`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch

from memtrain.kernels.dp_clip_once import cuda_once_fits, cuda_once_status, prepare
from memtrain.kernels.dp_linear_norms import ghost_is_cheaper

__all__ = ["PATHS", "UNSET", "choose_path", "cuda_once_serves", "describe_rules", "force_path", "log_choice"]

PATHS = ("once", "ghost", "direct")
logger = logging.getLogger("flashdp")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()  # no force_path block is active
_FORCED: contextvars.ContextVar[str | _Unset | None] = contextvars.ContextVar("flashdp_forced_path", default=UNSET)


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Force every DP Linear-like layer to use ``path`` (one of PATHS) inside the block; None: automatic."""
    if path is not None and path not in PATHS:
        raise ValueError(f"flashdp.dispatch.force_path: unknown path {path!r}; choose from {PATHS}")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def captured_override() -> str | _Unset | None:
    """The force_path override active now (UNSET outside any block); DP layers keep it from their forward."""
    return _FORCED.get()


def _env_path() -> str | None:
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


def choose_path(device_type: str, T: int, d_in: int, d_out: int, cuda_once: bool = False, *,
                captured: str | _Unset | None = UNSET) -> str:
    """The path for a layer of this shape: a force_path block active now, else the one ``captured`` at the
    layer's forward, else ``FLASHDP_PATH``, else the cached automatic choice."""
    forced = _FORCED.get()
    if forced is UNSET:
        forced = captured
    if forced is UNSET or forced is None:
        forced = _env_path()
    return forced or _auto(device_type, T, d_in, d_out, cuda_once)


def cuda_once_serves(d_out: int, d_in: int, device: torch.device, *, dtype: torch.dtype, has_bias: bool,
                     layout: str, fits: Callable[..., bool] | None = None) -> bool:
    """Whether the cooperative CUDA kernel serves this layer (the "once" path on CUDA).

    The kernel answers for itself (``memtrain.kernels.dp_clip_once.cuda_once_fits``): fp32, weight-only layers
    with nn.Linear's (out, in) layout whose tiles stay co-resident, once ``prepare(device)`` has built it;
    anything else (bf16, a bias, GPT-2 Conv1D's (in, out) weight, a kernel that failed to build) goes to the
    two-pass path. ``fits`` replaces ``cuda_once_fits`` (tests).
    """
    fits = cuda_once_fits if fits is None else fits
    return bool(fits(d_out, d_in, device, dtype=dtype, has_bias=has_bias, layout=layout))


def prepare_once_kernel(device: torch.device | None, prepared: set[torch.device]) -> None:
    """Build the cooperative CUDA kernel for ``device`` ahead of the first backward that could use it.

    Called by a private model's root forward pre-hook (so a model moved to the GPU after ``make_private`` is
    served too): once per device in ``prepared``; the kernel module remembers a failed build and never retries
    it. Skipped off CUDA and when ``FLASHDP_PATH`` forces another path.
    """
    if device is None or device.type != "cuda" or device in prepared or _env_path() not in (None, "once"):
        return
    prepared.add(device)
    prepare(device)


def log_choice(seen: set[tuple[str, str]], name: str, path: str, detail: str) -> None:
    """Log (DEBUG, logger "flashdp") the path a layer takes, once per (layer, path) in ``seen``."""
    key = (name, path)
    if key in seen or not logger.isEnabledFor(logging.DEBUG):
        return
    seen.add(key)
    logger.debug("flashdp: layer %s clips on the %r path (%s)", name, path, detail)


def describe_rules() -> dict[str, str]:
    """The dispatch rule per device, in words (for ``python -m memtrain.env_report``)."""
    forced = os.environ.get("FLASHDP_PATH")
    rules = {
        "cpu": "ghost norms + one row-scaled GEMM when 2·T² < d_in·d_out (ghost_is_cheaper), else 'once' "
               "(per-sample tiles in cache-sized chunks)",
        "cuda": "'once' (the cooperative single-pass kernel) for fp32, weight-only, (out, in) layers whose tiles fit "
                "co-resident (cuda_once_fits; cuda_once_reason says why a layer is not served); else ghost norms "
                "when 2·T² < d_in·d_out, else direct norms; then one row-scaled GEMM",
        "cuda 'once' kernel": cuda_once_status(),
        "tied groups": "per-use norms (ghost or direct by flops) + Gram cross terms, one clip for all uses",
    }
    if forced:
        rules["forced"] = f"FLASHDP_PATH={forced}: every layer takes this path"
    return rules
