"""Process memory, measured the same way everywhere: host RSS and its peak, host memory available, CUDA peaks.

Host: the resident set size comes from psutil. Its high-water mark (``VmHWM``) can be reset on Linux by
writing 5 to ``/proc/self/clear_refs``, so one process can measure several peaks in turn; glibc is asked
to return freed heap (``malloc_trim``) before a reset and to serve allocations above 64 KiB with their own
mappings (``mallopt``, :func:`tune_allocator`), so that freed tensors leave the RSS. Elsewhere the peak is
``ru_maxrss`` and cannot be reset (:func:`peak_rss_resettable` says which). Available host memory is
psutil's ``available`` (``MemAvailable`` on Linux). GPU: ``torch.cuda`` allocator counters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

import psutil

__all__ = [
    "PeakMeter",
    "available_host_bytes",
    "peak_rss_bytes",
    "peak_rss_resettable",
    "release_freed_memory",
    "reset_peak_rss",
    "rss_bytes",
    "tune_allocator",
]

_CLEAR_REFS = "/proc/self/clear_refs"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _load_libc():
    """glibc (for mallopt and malloc_trim), or None on other C libraries."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()
_tuned = False


def tune_allocator() -> bool:
    """Serve every allocation above 64 KiB with its own mapping, so that a freed tensor leaves the RSS at once.

    Returns whether the C library allowed it (glibc only). Applies to the whole process, once.
    """
    global _tuned
    if _LIBC is not None and not _tuned:
        _tuned = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 16))
    return _tuned


def rss_bytes() -> int:
    """This process's resident set size."""
    return psutil.Process().memory_info().rss


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark since it started or since the last :func:`reset_peak_rss`."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the others KiB


def peak_rss_resettable() -> bool:
    """Whether :func:`reset_peak_rss` can reset the high-water mark here (Linux >= 4.0)."""
    return os.access(_CLEAR_REFS, os.W_OK)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc), so that the RSS reflects live memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; returns whether it could (see :func:`peak_rss_resettable`)."""
    release_freed_memory()
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def available_host_bytes() -> int | None:
    """Host memory available to new allocations without swapping (``MemAvailable`` on Linux); None if unknown."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


class PeakMeter:
    """Current and peak memory of one device for this process: ``torch.cuda`` allocated bytes, or host RSS.

    ``reset()`` starts a new peak window from the present level. ``note`` is empty when peaks can be reset
    here and otherwise says why they include earlier windows.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        self.kind = "cuda" if self.cuda else "rss"
        self.note = ""
        if not self.cuda and not (tune_allocator() and peak_rss_resettable()):
            self.note = "RSS peak not resettable here (needs Linux and glibc): peaks include earlier windows"

    def collect(self) -> None:
        """Free what is garbage (and, on a GPU, the allocator's cached blocks) before a reading."""
        release_freed_memory()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def reset(self) -> None:
        self.collect()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()

    def current(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        return rss_bytes()

    def peak(self) -> int:
        """Peak since the last reset (allocated bytes on a GPU, RSS on the host)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return peak_rss_bytes()

    def counters(self) -> dict[str, int]:
        """Every counter beside the peak: the RSS high-water mark, and on a GPU allocated and reserved peaks."""
        out = {"rss_peak_bytes": peak_rss_bytes()}
        if self.cuda:
            import torch

            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out
