"""Peak-memory probes that can be reset, so that every method of a comparison is measured in one process.

GPU: ``torch.cuda`` counters (``max_memory_allocated`` and ``max_memory_reserved`` since a reset).
CPU: the resident set size. Linux can reset the process's RSS high-water mark (``/proc/self/clear_refs``,
value 5), and glibc is told to serve every allocation above 64 KiB with its own mapping (``mallopt``) and
to return freed heap (``malloc_trim``), so that the RSS falls back when a method's tensors are freed and
the next method's peak is its own. Where either is missing the probe says so in its ``note``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import torch

_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
_TUNED = False


def tune_allocator() -> bool:
    """Make freed tensors leave the RSS (glibc only); returns whether it could."""
    global _TUNED
    if _LIBC is not None and not _TUNED:
        _TUNED = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 16))
    return _TUNED


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size (0 where /proc is missing)."""
    return _status("VmRSS") or 0


def reset_rss_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); returns whether it could."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    return _status("VmHWM") or 0


class MemoryProbe:
    """Baseline, current and peak memory of one method; ``kind`` is 'cuda' or 'rss'."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.kind = "cuda" if self.cuda else "rss"
        self.note = ""
        if not self.cuda and not (tune_allocator() and os.path.exists("/proc/self/clear_refs")):
            self.note = "RSS peak not resettable here (needs Linux and glibc): peaks include earlier methods"
        self.baseline = 0

    def collect(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def reset(self) -> None:
        """Start a new peak window from the present level."""
        self.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_rss_peak()

    def start(self) -> None:
        """Reset the peak and take the baseline: everything measured later is an increase over it."""
        self.reset()
        self.baseline = self.current_total()

    def current_total(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else rss_bytes()

    def current(self) -> int:
        return self.current_total() - self.baseline

    def peak(self) -> int:
        """Peak increase over the baseline since the last reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return rss_peak_bytes() - self.baseline

    def extra(self) -> dict:
        """Device counters beside the peak: reserved memory on GPU, and the process RSS peak in both cases."""
        out = {"rss_peak_bytes": rss_peak_bytes()}
        if self.cuda:
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out


class RssTimeline:
    """Samples the RSS every ``interval`` seconds on a thread, tagging each sample with the current phase."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.phase = "idle"
        self.samples: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_bytes(), self.phase))
            time.sleep(self.interval)

    def __enter__(self) -> RssTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_json(self) -> list[dict]:
        return [{"t_s": round(t, 4), "rss_bytes": r, "phase": p} for t, r, p in self.samples]
