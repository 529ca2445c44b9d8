"""Named regions of flashdp's own work, for ``torch.profiler``: where a private step's extra time goes.

Under a running ``torch.profiler.profile`` each region is one event (its time includes the ops inside):

- ``flashdp.norms``: the per-sample squared norms of a clip group's uses (ghost Grams, direct tiles, the
  cross terms of a tied group), the work non-DP training does not do;
- ``flashdp.clipped_sum``: the clipped sum ``Σ_b c_b g_b`` added to ``.grad``; it replaces the weight-gradient
  GEMM of non-DP training (same flops), so only its row scaling is extra;
- ``flashdp.clip_once``: norms and clipped sum in one pass over per-sample gradient tiles (the dispatcher's
  ``"once"`` path: short sequences and small layers on CPU, the cooperative kernel on CUDA);
- ``flashdp.finite_check``, ``flashdp.noise``, ``flashdp.scale``: ``DPOptimizer.step``'s NaN/inf check, Gaussian
  noise and division by the expected batch size;
- ``flashdp.all_reduce``: the gradient sum across ranks (torch.distributed without DDP/FSDP2 doing it).

Outside a profiler a region costs one flag test (no ``record_function`` is created).
``memtrain-bench dp --profile-ops N`` reports them per step beside non-DP's ops.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.profiler as _autograd_profiler

__all__ = ["ALL_REDUCE", "CLIPPED_SUM", "CLIP_ONCE", "FINITE_CHECK", "NOISE", "NORMS", "REGIONS", "SCALE", "region"]

NORMS = "flashdp.norms"
CLIPPED_SUM = "flashdp.clipped_sum"
CLIP_ONCE = "flashdp.clip_once"
FINITE_CHECK = "flashdp.finite_check"
NOISE = "flashdp.noise"
SCALE = "flashdp.scale"
ALL_REDUCE = "flashdp.all_reduce"
REGIONS = (NORMS, CLIPPED_SUM, CLIP_ONCE, FINITE_CHECK, NOISE, SCALE, ALL_REDUCE)


def region(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function(name)`` while a profiler runs, else a no-op context."""
    if _autograd_profiler._is_profiler_enabled:  # set by torch.profiler.profile, read at each call
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
