"""Stop zo2's worker threads before the interpreter finalizes.

zo2's half workers and CPU copy streams are daemon threads, so that a forgotten engine never keeps a process
alive. A daemon thread that is still alive when CPython finalizes is stopped the moment it next takes the GIL
(``pthread_exit``); if that happens inside a C++ frame (a torch op returning, a tensor freed), the forced
unwind meets a ``noexcept`` frame and the process aborts with "terminate called without an active
exception". Every worker group registers itself here; at interpreter exit, before ``atexit`` handlers and
before daemon threads are frozen (the hook ``concurrent.futures`` uses), each live group is closed: its
threads are told to stop and joined.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol


class _Closable(Protocol):
    def close(self) -> None: ...


_LIVE: weakref.WeakSet = weakref.WeakSet()
EXIT_JOIN_TIMEOUT_S = 30.0  # a thread still running a job this long after exit began is left to the OS


def close_at_exit(group: _Closable) -> None:
    """Close ``group`` (stop and join its threads) at interpreter exit if it is still alive then."""
    _LIVE.add(group)


def _close_live_groups() -> None:
    for group in list(_LIVE):
        group.close()


threading._register_atexit(_close_live_groups)
