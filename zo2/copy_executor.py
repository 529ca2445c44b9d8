"""Asynchronous copy streams on the CPU, and injected copy delays: stream-ordering tests without a GPU.

On CUDA the ring's uploads and offloads run on their own streams and the compute waits on events. On
the CPU the copies are synchronous by default, so a missing wait cannot corrupt anything there. An
:class:`AsyncCopyExecutor` gives the CPU ring the CUDA semantics: one FIFO worker thread per copy
stream ("upload" and "offload"), and :class:`HostEvent` s that are recorded when a copy finishes and
waited on exactly where the CUDA path waits on its events. A missing wait then reads or overwrites a
slot while a copy is still in flight, and the results go wrong.

The delay hook, for tests and ``memtrain-bench gpu-check``:

- ``ring.before_copy``: ``Callable[[str, int], None] | None`` (``before_copy(kind, slot)``, kind
  "upload" or "offload"), called just before each copy is issued: on the copy stream's worker thread
  with an executor, inside ``torch.cuda.stream(copy_stream)`` on CUDA (so ``torch.cuda._sleep`` there
  delays the copy stream, not the host), inline otherwise.
- :func:`inject_copy_delays` sets it on an engine: seeded random sleeps on the CPU
  (:func:`random_sleeps`), seeded random ``torch.cuda._sleep`` spins on CUDA (:func:`random_cuda_spins`).
- :func:`use_async_copies` puts an engine's CPU ring on an :class:`AsyncCopyExecutor` (between steps).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable

import torch

from zo2.thread_exit import EXIT_JOIN_TIMEOUT_S, close_at_exit

BeforeCopy = Callable[[str, int], None]


class HostEvent:
    """A waitable marker on a CPU copy stream (the role of ``torch.cuda.Event``): set when the work
    queued before it has finished."""

    def __init__(self, done: bool = False) -> None:
        self._event = threading.Event()
        self.error: BaseException | None = None
        if done:
            self._event.set()

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._event.set()

    def query(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        """Block until the event is set; re-raise the error of the copy it marks, if it failed."""
        self._event.wait()
        if self.error is not None:
            raise RuntimeError("zo2 copy stream: a copy failed") from self.error


class CopyStream:
    """A FIFO of copies run by one worker thread; each copy first waits on its events."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"zo2-{name}", daemon=True)
        self._thread.start()
        close_at_exit(self)

    def submit(self, waits: list[HostEvent], work: Callable[[], None]) -> HostEvent:
        """Queue ``work`` after ``waits``; returns the event set when it has run."""
        done = HostEvent()
        self._queue.put((waits, work, done))
        return done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            waits, work, done = item
            try:
                for event in waits:
                    event.wait()
                work()
            except BaseException as exc:  # surfaced to whoever waits on ``done``
                done.set(exc)
            else:
                done.set()

    def synchronize(self) -> None:
        self.submit([], lambda: None).wait()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(EXIT_JOIN_TIMEOUT_S)


class AsyncCopyExecutor:
    """The CPU ring's two copy streams, each on its own worker thread."""

    def __init__(self) -> None:
        self.upload = CopyStream("upload")
        self.offload = CopyStream("offload")

    def synchronize(self) -> None:
        self.upload.synchronize()
        self.offload.synchronize()

    def close(self) -> None:
        self.upload.close()
        self.offload.close()


def random_sleeps(seed: int, max_seconds: float, offload_max_seconds: float | None = None) -> BeforeCopy:
    """A ``before_copy`` that sleeps a seeded uniform [0, max_seconds) before each upload and [0,
    offload_max_seconds) (default: max_seconds) before each offload; one generator per copy stream, so
    each stream's sequence of delays is reproducible."""
    rngs = {"upload": random.Random(seed), "offload": random.Random(seed + 1)}
    limit = {"upload": max_seconds, "offload": max_seconds if offload_max_seconds is None else offload_max_seconds}

    def before_copy(kind: str, slot: int) -> None:
        time.sleep(rngs[kind].random() * limit[kind])

    return before_copy


def random_cuda_spins(seed: int, max_cycles: int) -> BeforeCopy:
    """A ``before_copy`` that queues ``torch.cuda._sleep`` of a seeded uniform [0, max_cycles) GPU cycles
    on the current (copy) stream before each copy."""
    rngs = {"upload": random.Random(seed), "offload": random.Random(seed + 1)}

    def before_copy(kind: str, slot: int) -> None:
        torch.cuda._sleep(int(rngs[kind].random() * max_cycles))

    return before_copy


def inject_copy_delays(engine, before_copy: BeforeCopy | None) -> None:
    """Call ``before_copy(kind, slot)`` before each of ``engine``'s ring copies (None: no delays)."""
    engine.streamer.ring.before_copy = before_copy


def use_async_copies(engine) -> AsyncCopyExecutor:
    """Run ``engine``'s CPU ring copies on an :class:`AsyncCopyExecutor` (call between steps)."""
    executor = AsyncCopyExecutor()
    engine.streamer.ring.set_executor(executor)
    return executor
