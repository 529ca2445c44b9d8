"""The two private autograd-engine calls flashdp relies on, in one place.

- ``current_graph_task_id()``: which backward pass (graph task) is running, so the uses of a tied clip
  group are matched within one pass and a nested (reentrant) backward keeps its own bookkeeping;
- ``queue_callback(fn)``: run ``fn`` when the running backward pass ends, to clip what is still deferred.

Both are private torch APIs (``torch._C._current_graph_task_id`` and
``torch.autograd.Variable._execution_engine.queue_callback``, stable through torch 2.13). If a torch
release removes or changes them, these functions raise a :class:`~flashdp.errors.FlashDPError` naming the
call and the torch version instead of an AttributeError deep inside a backward pass, and
tests/flashdp/test_autograd_engine.py fails with the same message.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import FlashDPError

__all__ = ["current_graph_task_id", "queue_callback"]


def _broken(what: str, err: BaseException) -> FlashDPError:
    return FlashDPError(
        f"flashdp: torch {torch.__version__} changed the private autograd-engine API {what} that flashdp uses to "
        f"follow backward passes ({type(err).__name__}: {err}). Use a torch version flashdp supports (2.x up to "
        "2.13 is tested), or update flashdp/_autograd_engine.py for this torch."
    )


def current_graph_task_id() -> int:
    """Id of the backward pass running in this thread (>= 0), or -1 outside the autograd engine."""
    try:
        task = torch._C._current_graph_task_id()
    except (AttributeError, TypeError, RuntimeError) as err:
        raise _broken("torch._C._current_graph_task_id()", err) from err
    if not isinstance(task, int):
        raise _broken("torch._C._current_graph_task_id()", TypeError(f"returned {type(task).__name__}, not int"))
    return task


def queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` (no arguments) once the backward pass running in this thread has finished."""
    try:
        engine = torch.autograd.Variable._execution_engine
        queue = engine.queue_callback
    except AttributeError as err:
        raise _broken("torch.autograd.Variable._execution_engine.queue_callback", err) from err
    try:
        queue(fn)
    except TypeError as err:
        raise _broken("torch.autograd.Variable._execution_engine.queue_callback(fn)", err) from err
