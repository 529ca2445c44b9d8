"""Run the 2q perturbed forward passes of one step in lock-step, block by block.

Each pass ("half": θ+εz_k or θ-εz_k) runs the user's closure on its own worker thread. A baton lets
exactly one half run at a time, in the order

    prologue of half 0, ..., prologue of half H-1, block 0 of half 0, ..., block 0 of half H-1, block 1 ...

so every block is used by all halves while it is resident, and the closure keeps its ordinary form
(``lambda: model(**batch).loss``): nothing in the model's forward code is replaced. A half hands the
baton over when it enters the next block (a forward pre-hook calls :meth:`HalfScheduler.enter_block`)
and when its closure returns; the scheduler's ``on_turn`` callback runs each time a half takes the
baton (the offload engine moves the resident parameters to that half's perturbation there). The
caller's per-thread state (grad and inference mode, autocast, the CUDA device and stream, the default
device, ``contextvars``) is captured at the start of the step and reproduced in each half
(:class:`ThreadState`); torch modes, which cannot be, are refused.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from zo2.thread_exit import EXIT_JOIN_TIMEOUT_S, close_at_exit


class HalfAborted(BaseException):
    """Raised inside a waiting half when another half failed; unwinds its closure. Not an error."""


class ClosureProtocolError(RuntimeError):
    """The closure did not run the model's blocks exactly once, in order."""


@dataclass
class _HalfContext:
    half: int
    last_block: int = -1
    model_calls: int = 0  # calls of the model's forward in this half (the engine counts them)


class HalfScheduler:
    """The baton: slot (b, h) = (b + 1)·H + h, where b = -1 is the code before the first block."""

    def __init__(self, num_halves: int, num_blocks: int,
                 on_turn: Callable[[int], None] | None = None) -> None:
        self.num_halves = num_halves
        self.num_blocks = num_blocks
        self.on_turn = on_turn  # called with the half each time a half takes the baton, in its thread
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
        if self.on_turn is not None:
            self.on_turn(slot % self.num_halves)

    def _advance(self) -> None:
        with self._cond:
            self._turn += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def enter_model(self) -> None:
        """The model's forward starts in this half (to tell a second call from a block reused inside one)."""
        self._local.ctx.model_calls += 1

    def enter_block(self, block: int) -> None:
        """Hand the baton on, and wait until this half may run ``block``."""
        ctx: _HalfContext = self._local.ctx
        if block <= ctx.last_block and ctx.model_calls <= 1:
            raise ClosureProtocolError(
                f"zo2.offload: the model's forward ran block {block} again after block {ctx.last_block} within one "
                "call: it reuses its blocks (a looped or recurrent-depth model such as HRM or Dory). An offloaded "
                "step streams each block through the device once per perturbation, so a block can run only once "
                "per forward: pass blocks= a list of modules that the forward runs once each, in order, or keep "
                "this model on the device (plain zo2.ZOSGD without offload)")
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
        close_at_exit(self)

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
        """Stop the workers and wait for them (a job in flight finishes first)."""
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(EXIT_JOIN_TIMEOUT_S)
        self._threads.clear()
        self._inboxes.clear()


class ThreadStateError(RuntimeError):
    """The caller's thread has per-thread torch state that the halves' worker threads cannot reproduce."""


class ThreadState:
    """The calling thread's per-thread state, captured at the start of a step to be reproduced in each
    half's worker thread (torch keeps some state per thread).

    Carried into every half:

    - grad mode: the halves always run under ``torch.no_grad()``; inference mode if it is on;
    - autocast: enabled/dtype for "cpu" and "cuda", and whether its cast cache is on;
    - CUDA: the current device and its current stream;
    - the default device (``torch.set_default_device``; torch keeps it per thread);
    - ``contextvars``: each half runs in its own copy of the caller's context (a change a closure makes
      to a context variable stays in its half).

    Process-wide, so already shared: the default dtype (``torch.set_default_dtype``), the number of CPU
    threads, the RNGs, the deterministic-algorithm and TF32 flags.

    Refused with :class:`ThreadStateError` when captured (before anything moves): an active
    ``TorchFunctionMode`` other than the default device, or a ``TorchDispatchMode`` (e.g.
    ``FlopCounterMode``, ``FakeTensorMode``); the fix is to enter the mode inside the closure.
    """

    def __init__(self) -> None:
        _refuse_modes()
        self.autocast = [(dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")
                         if torch.is_autocast_enabled(dev)]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.default_device = torch.get_default_device()
        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_device = torch.cuda.current_device() if on_cuda else None
        self.stream = torch.cuda.current_stream() if on_cuda else None
        self.context = contextvars.copy_context()

    def _enter(self) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode() if self.inference else torch.no_grad())
        if self.default_device != torch.get_default_device():
            stack.enter_context(self.default_device)
        for dev, dtype in self.autocast:
            stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=self.autocast_cache))
        if self.cuda_device is not None:
            stack.enter_context(torch.cuda.device(self.cuda_device))
            stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def run(self, fn: Callable[[], object]) -> object:
        """Call ``fn`` (in a worker thread) under the captured state, in a copy of the captured context."""

        def inner() -> object:
            with self._enter():
                return fn()

        return self.context.copy().run(inner)


def _refuse_modes() -> None:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = [m for m in _get_current_function_mode_stack() if not isinstance(m, DeviceContext)]
    modes += _get_current_dispatch_mode_stack()
    if modes:
        names = ", ".join(type(m).__name__ for m in modes)
        raise ThreadStateError(
            f"zo2.offload: opt.step was called under {names}. An offloaded step runs each perturbed forward "
            "pass on a worker thread and torch keeps such modes per thread, so it would not apply there: enter "
            "the mode inside the closure, e.g. `def closure():\n    with mode: return model(**batch).loss`")
