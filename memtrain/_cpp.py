"""Loader of the optional C++ extension ``memtrain._C``.

The extension is built by ``setup.py`` when it can be; when it is missing, callers fall back to plain
torch. :func:`cpp_available` tells which, :func:`require_cpp` raises with the original import error
and the fix, and :func:`warn_fallback_once` reports each op that falls back, once per process.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

_FIX = (
    "reinstall with torch already installed and build isolation off: "
    "`pip install torch && pip install --no-build-isolation memtrain` (from a checkout: "
    "`pip install --no-build-isolation .`); the build log explains a failure"
)


@functools.cache
def _load() -> tuple[ModuleType | None, BaseException | None]:
    try:
        from memtrain import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
        return None, exc
    return _C, None


def cpp_available() -> bool:
    """Whether the compiled CPU kernels can be used in this process."""
    return _load()[0] is not None


def cpp_error() -> BaseException | None:
    """The exception raised while importing the extension, or None when it loaded."""
    return _load()[1]


def require_cpp() -> ModuleType:
    """Return the extension module, or raise RuntimeError naming the import error and the fix."""
    module, exc = _load()
    if module is None:
        raise RuntimeError(f"memtrain's C++ extension is not available ({exc!r}); {_FIX}") from exc
    return module


_warned: set[str] = set()


def warn_fallback_once(op: str) -> None:
    """Warn, once per op and process, that ``op`` runs its plain-torch fallback on CPU."""
    if op in _warned:
        return
    _warned.add(op)
    warnings.warn(
        f"memtrain: the C++ extension is not available ({cpp_error()!r}); {op} falls back to plain torch "
        f"on CPU (correct, several times slower). To build it, {_FIX}.",
        RuntimeWarning,
        stacklevel=3,
    )
