"""The bench's memory windows: increases over a baseline, on top of :class:`memtrain.memory.PeakMeter`.

Every method of a comparison is measured in one process: the peak is reset before each window (build,
first step, steady steps) and reported as an increase over a baseline taken just before the model is
built. On the host the RSS high-water mark is reset with Linux's ``clear_refs``; where it cannot be, the
probe's ``note`` says so. :class:`RssTimeline` samples the RSS on a thread for ``--profile-memory``.
"""

from __future__ import annotations

import threading
import time

from memtrain.memory import PeakMeter, rss_bytes


class MemoryProbe(PeakMeter):
    """A :class:`PeakMeter` whose readings are increases over ``baseline`` (taken by :meth:`start`)."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.baseline = 0

    def start(self) -> None:
        """Reset the peak and take the baseline: everything measured later is an increase over it."""
        self.reset()
        self.baseline = super().current()

    def current(self) -> int:
        return super().current() - self.baseline

    def peak(self) -> int:
        return super().peak() - self.baseline


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
