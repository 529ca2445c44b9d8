"""Launch helpers shared by the Triton launchers: grid limits and device checks.

CUDA caps a grid at 2³¹-1 programs on axis 0 and 65535 on axes 1 and 2; a launch past a limit fails
with an opaque driver error (or, worse, silently launches fewer programs on some stacks). Every
launcher therefore builds its grid through :func:`checked_grid`, which raises a ValueError naming the
operation, the axis and the shape that asked for it. Nothing here imports Triton.

Device. Triton launches on the *current* CUDA device, not the tensors': a tensor on ``cuda:1`` with device 0
current fails ("Pointer argument cannot be accessed from Triton") or reads a wrong address. Every launch
therefore runs inside :func:`on_device_of` (the tensor's device made current). Inside it, the first launch
of a thread on a device also makes the device's primary context current in that thread: Triton before 3.2
launches through the driver API and expects a current context, which a worker thread (zo2's step runs
in one) lacks until its first CUDA runtime call; a Triton launch can come first there (the embedding's
perturbation runs before any torch op of the thread).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence

import torch

__all__ = ["GRID_LIMITS", "checked_grid", "interpreting", "on_device_of", "require_triton_device"]

# CUDA's maximum grid dimensions (x, y, z): cudaDeviceProp::maxGridSize on every architecture since sm_30.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def checked_grid(grid: Sequence[int], op: str, what: str = "") -> tuple[int, ...]:
    """``grid`` as a tuple, or a ValueError when an axis is empty-negative or past CUDA's limit.

    Args:
        grid: programs per axis (1 to 3 axes).
        op: the operation's name, for the message.
        what: the shape that produced the grid (e.g. ``"B=8, T=4096, 4096x32000"``), for the message.
    """
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{op}: a grid has 1 to 3 axes, got {grid}")
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
        if n < 0 or n > limit:
            raise ValueError(
                f"{op}: grid axis {axis} needs {n} programs but CUDA allows at most {limit} "
                f"({what or 'this shape'}); split the call (fewer samples or a shorter sequence per call)"
            )
    return grid


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when the kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless every tensor can be read by a Triton kernel: CUDA, or any device under the interpreter."""
    if interpreting():
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                f"{op}: the Triton kernel needs CUDA tensors, got one on {t.device}; move the inputs to the GPU, "
                "call the torch implementation for CPU tensors, or run under TRITON_INTERPRET=1"
            )



_CONTEXTS = threading.local()  # .devices: the CUDA devices whose context this thread has made current


def _device_of(t: torch.Tensor) -> torch.device:
    return t.device


def _make_context_current(index: int) -> None:
    """Once per thread and device: one CUDA runtime call on the device (a stream query: no sync, no work), which
    makes its primary context current in this thread."""
    done = getattr(_CONTEXTS, "devices", None)
    if done is None:
        done = _CONTEXTS.devices = set()
    if index not in done:
        torch.cuda.current_stream(index).query()
        done.add(index)


@contextlib.contextmanager
def on_device_of(t: torch.Tensor) -> Iterator[None]:
    """Run the block with ``t``'s CUDA device current (and its context current in this thread); nothing for a
    tensor elsewhere (CPU tensors under the Triton interpreter)."""
    device = _device_of(t)
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        _make_context_current(index)
        yield
