"""Run the 2q perturbed forward passes of one step in lock-step, block by block.

Each pass ("half": θ+εz_k or θ-εz_k) runs the user's closure on its own worker thread. A baton lets
exactly one half run at a time, in the order

    prologue of half 0, ..., prologue of half H-1, block 0 of half 0, ..., block 0 of half H-1, block 1 ...

so every block is used by all halves while it is resident, and the closure keeps its ordinary form
(``lambda: model(**batch).loss``): nothing in the model's forward code is replaced. A half hands the
baton over when it enters the next block (a forward pre-hook calls :meth:`HalfScheduler.enter_block`)
and when its closure returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch


class HalfAborted(BaseException):
    """Raised inside a waiting half when another half failed; unwinds its closure. Not an error."""


class ClosureProtocolError(RuntimeError):
    """The closure did not run the model's blocks exactly once, in order."""


@dataclass
class _HalfContext:
    half: int
    last_block: int = -1


class HalfScheduler:
    """The baton: slot (b, h) = (b + 1)·H + h, where b = -1 is the code before the first block."""

    def __init__(self, num_halves: int, num_blocks: int) -> None:
        self.num_halves = num_halves
        self.num_blocks = num_blocks
        self._cond = threading.Condition()
        self._turn = 0
        self._aborted = False
        self._local = threading.local()

    # ------------------------------------------------------------------ called from the half threads
    @property
    def current_half(self) -> int | None:
        """The half this thread runs, or None outside a step's worker."""
        ctx = getattr(self._local, "ctx", None)
        return None if ctx is None else ctx.half

    def _wait_for(self, slot: int) -> None:
        with self._cond:
            while self._turn != slot and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise HalfAborted()

    def _advance(self) -> None:
        with self._cond:
            self._turn += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def enter_block(self, block: int) -> None:
        """Hand the baton on, and wait until this half may run ``block``."""
        ctx: _HalfContext = self._local.ctx
        if block != ctx.last_block + 1:
            what = ("ran the model a second time" if block <= ctx.last_block
                    else f"skipped block(s) {ctx.last_block + 1}..{block - 1}")
            raise ClosureProtocolError(
                f"zo2.offload: the closure {what} (block {block} after block {ctx.last_block}). An offloaded "
                "step runs the closure once per perturbation and it must call the model exactly once, running "
                "every block in order, e.g. `lambda: model(**batch).loss`")
        self._advance()
        self._wait_for((block + 1) * self.num_halves + ctx.half)
        ctx.last_block = block

    def run_half(self, half: int, fn: Callable[[], object]) -> object:
        """Run ``fn`` as ``half`` under the baton; checks that it ran every block."""
        ctx = _HalfContext(half)
        self._local.ctx = ctx
        try:
            self._wait_for(half)
            result = fn()
            if ctx.last_block != self.num_blocks - 1:
                detail = ("did not run the model" if ctx.last_block < 0
                          else f"ran blocks 0..{ctx.last_block} of {self.num_blocks}")
                raise ClosureProtocolError(
                    f"zo2.offload: the closure {detail}. An offloaded step runs the closure once per "
                    "perturbation and it must call the model exactly once, e.g. `lambda: model(**batch).loss`")
            self._advance()
            return result
        finally:
            self._local.ctx = None


class HalfWorkers:
    """Persistent worker threads, one per half (threads are kept so that the OpenMP pools of the CPU
    kernels are not rebuilt every step)."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._inboxes: list[queue.Queue] = []

    def _ensure(self, n: int) -> None:
        while len(self._threads) < n:
            inbox: queue.Queue = queue.Queue()
            thread = threading.Thread(target=self._loop, args=(inbox,), daemon=True,
                                      name=f"zo2-half-{len(self._threads)}")
            thread.start()
            self._threads.append(thread)
            self._inboxes.append(inbox)

    @staticmethod
    def _loop(inbox: queue.Queue) -> None:
        while True:
            job = inbox.get()
            if job is None:
                return
            index, fn, done = job
            try:
                done.put((index, True, fn()))
            except BaseException as exc:  # handed to the caller, which re-raises
                done.put((index, False, exc))

    def run(self, jobs: list[Callable[[], object]], on_error: Callable[[], None]) -> list[tuple[bool, object]]:
        """Run ``jobs[i]`` on worker i; ``on_error`` is called as soon as one fails (to abort the others).
        Returns (ok, result-or-exception) per job."""
        self._ensure(len(jobs))
        done: queue.Queue = queue.Queue()
        for i, fn in enumerate(jobs):
            self._inboxes[i].put((i, fn, done))
        results: list[tuple[bool, object]] = [(False, None)] * len(jobs)
        pending = len(jobs)
        try:
            while pending:
                i, ok, value = done.get()
                results[i] = (ok, value)
                if not ok:
                    on_error()
                pending -= 1
        except BaseException:  # KeyboardInterrupt while waiting: stop the halves, wait for them
            on_error()
            while pending:
                done.get()
                pending -= 1
            raise
        return results

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        self._threads.clear()
        self._inboxes.clear()


def thread_state_context() -> Callable[[], ExitStack]:
    """A factory of context managers that reproduce this thread's grad-free, autocast and CUDA stream
    state in a worker thread (torch keeps them per thread)."""
    autocast = [(dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def make() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.no_grad())
        for dev, dtype in autocast:
            stack.enter_context(torch.autocast(dev, dtype=dtype))
        if stream is not None:
            stack.enter_context(torch.cuda.stream(stream))
        return stack

    return make
