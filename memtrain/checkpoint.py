"""Save and resume a training run (model, optimizer, scheduler, accountant, RNG states) in one atomic file.

Works for both front-ends: ``zo2.ZOSGD``'s state_dict carries its base seed and step counter,
``flashdp.DPOptimizer``'s its noise seed and step counter (the noise is a function of them),
``flashdp.PrivacyAccountant`` its history, so a resumed run continues the uninterrupted one bit for bit on CPU.

The file holds only tensors and plain Python containers, so ``torch.load(path, weights_only=True)``
reads it. A save writes a temporary file in the same directory, flushes it to disk (fsync) and renames
it over the target with ``os.replace`` (atomic on POSIX and Windows): a save interrupted at any point
leaves the previous checkpoint intact, at worst next to a stray ``.<name>.tmp-*`` file.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "memtrain-checkpoint-v1"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but the checkpoint does not need it
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_tuples(x: Any) -> Any:
    """random.setstate needs tuples; a weights-only load may give lists back."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` half-written: temp file, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, accountant: Any = None,
                    extra: dict[str, Any] | None = None, rng: bool = True) -> None:
    """Write a resumable checkpoint of the run to ``path`` atomically.

    Args:
        model: its ``state_dict()`` (taken after the optimizer's, which flushes a zo2 offload engine).
        optimizer: ``ZOSGD``, ``DPOptimizer`` or any torch optimizer (its ``state_dict()``).
        scheduler: an LR scheduler (its ``state_dict()``).
        accountant: a ``flashdp.PrivacyAccountant`` (its history).
        extra: your own tensors and plain values (epoch, data-loader generator state, ...).
        rng: also save the global torch, Python and NumPy RNG states (restored by ``load_checkpoint``).
    """
    ckpt: dict[str, Any] = {"format": CHECKPOINT_FORMAT}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()  # first: ZOSGD.state_dict flushes pending updates
    if model is not None:
        flush = getattr(optimizer, "flush", None)
        if flush is not None:
            flush()
        ckpt["model"] = model.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if accountant is not None:
        ckpt["accountant"] = accountant.state_dict()
    if rng:
        ckpt["rng"] = _rng_state()
    ckpt["extra"] = dict(extra or {})
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, accountant: Any = None,
                    rng: bool = True, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns the checkpoint's ``extra``.

    The file is read with ``torch.load(weights_only=True)`` (no arbitrary code runs). Each object passed
    must have been saved: asking for a part the checkpoint lacks is an error, not a silent skip.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"memtrain.load_checkpoint: {path} is not a memtrain checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r}); write it with memtrain.checkpoint.save_checkpoint")
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                      ("accountant", accountant), ("rng", rng or None)):
        if obj is not None and name not in ckpt:
            raise KeyError(f"memtrain.load_checkpoint: {path} has no {name!r} entry; it was saved without "
                           f"{name}=..., so it cannot be restored from it")
    if model is not None:
        model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if accountant is not None:
        accountant.load_state_dict(ckpt["accountant"])
    if rng:
        _set_rng_state(ckpt["rng"])
    return ckpt["extra"]
