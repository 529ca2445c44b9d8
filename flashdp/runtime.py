"""What a private model tracks while it runs: its forward's batch size and its backward passes.

One :class:`Runtime` per model made private, owned by its :class:`~flashdp.privatize.PrivacyState` and
shared by its clip groups; two private models in one process share nothing.

- Forward: a pre-hook on the root module records the batch size of the forward now running (a stack per
  thread, so a nested or concurrent forward of the same model keeps its own). DP layers read it to tell
  a flattened batch (OPT's ``reshape(-1, d)``) or a broadcast input (GPT-2's ``position_ids``) from a
  batch-first one.
- Backward: per pass (autograd graph task), the batch size the DP layers agreed on, the tied groups still
  waiting for a use, and a scratch dict the layers may cache per-pass results in (the Gram matrix of an
  input read by several layers). An engine callback ends the pass: deferred groups are clipped and the
  pass's record is dropped. A pass that raised never reaches its callback; its record is dropped once
  :data:`MAX_OPEN_PASSES` newer passes exist. Under FSDP2 (``sharded``) a group still waiting at the end of
  the pass is an error: FSDP2 has reduced the gradients by then, so its clipped sum could not be completed.
- Parameters: every tensor a DP layer runs with gets a hook that refuses a gradient from autograd (a use
  outside the DP layer, which would escape clipping). The tensors are watched as the layers see them, so
  the unsharded parameters FSDP2 swaps in during forward are covered too.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _autograd_engine
from .errors import FlashDPError

if TYPE_CHECKING:
    from .groups import ClipGroup

__all__ = ["MAX_OPEN_PASSES", "Runtime"]

MAX_OPEN_PASSES = 64  # records kept for passes that never ended (they raised); nested passes need only a few

_BATCH_KWARGS = ("input_ids", "inputs_embeds", "x", "input", "pixel_values")


@dataclass(eq=False)
class _Pass:
    batch_size: int | None  # None once a mismatch was reported
    deferred: list[ClipGroup] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Per-model state of running forward and backward passes (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._passes: dict[int, _Pass] = {}
        self.logged_paths: set[tuple[str, str]] = set()  # (layer, path) already reported by the dispatcher
        self._watched: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter → its outside-DP hook's handle
        self.sharded = False  # under FSDP2 (set by flashdp.fsdp): deferral to the end of a pass is refused
        self.checked_units: tuple[int, ...] = ()  # the FSDP2 units the clip groups were last checked against

    def __deepcopy__(self, memo: dict) -> Runtime:
        """A copied model starts with no forward or backward pass running: a fresh Runtime."""
        return Runtime()

    def __getstate__(self) -> dict:
        return {}  # nothing of a running pass survives pickling

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    # -- forward ---------------------------------------------------------------------------------------
    def _stack(self) -> list[int | None]:
        stack = getattr(self._local, "batch", None)
        if stack is None:
            stack = self._local.batch = []
        return stack

    def model_batch(self) -> int | None:
        """Batch size of the private model's forward running in this thread (None outside one)."""
        stack = self._stack()
        return stack[-1] if stack else None

    def forward_pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Root-module pre-hook: record the batch size (dim 0 of the first tensor argument)."""
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None:
            t = next((kwargs[k] for k in _BATCH_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)
        if t is None:
            t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        self._stack().append(int(t.shape[0]) if t is not None and t.dim() > 0 else None)

    def forward_hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Root-module hook (always called, also when forward raised): forget this forward's batch size."""
        stack = self._stack()
        if stack:
            stack.pop()

    def sample_count(self, lead: int, where: str) -> int:
        """Number of samples in a DP layer input whose dim 0 has size ``lead``.

        Inside a forward of the private model with batch B, an input of ``k·B`` rows is the batch flattened
        sample-major (``x.reshape(-1, d)`` of a (B, T, d) tensor, as OPT's decoder layers do): B samples of k
        rows each.
        """
        B = self.model_batch()
        if B is None or lead == B or B == 0:
            return lead
        if lead > B and lead % B == 0:
            return B
        raise FlashDPError(
            f"flashdp: {where} got an input with {lead} rows in dim 0 while the model's batch has {B} samples. "
            "flashdp takes dim 0 of every DP layer's input as the sample dimension (or the batch flattened "
            "sample-major): keep inputs batch-first (batch_first=True), and expand broadcast inputs to the batch."
        )

    # -- parameters ------------------------------------------------------------------------------------
    def watch(self, module: torch.nn.Module) -> None:
        """Hook the trainable tensors ``module`` holds now (once each) against gradients from outside DP layers.

        Called on every DP-layer forward: the module remembers (weakly) the tensor it last had watched per
        attribute, so the common case costs a dict lookup per parameter.
        """
        names = module.__dict__.get("_flashdp_param_names")
        if not names:
            return
        last = module.__dict__.setdefault("_flashdp_watched", {})
        for attr, name in names.items():
            p = module._parameters.get(attr)
            if p is None or not p.requires_grad:
                continue
            ref = last.get(attr)
            if ref is not None and ref() is p:
                continue
            if p not in self._watched:
                self._watched[p] = p.register_hook(_outside_dp_hook(name))
            last[attr] = weakref.ref(p)

    def unwatch_all(self) -> None:
        """Remove every hook :meth:`watch` registered (make_private called again)."""
        for handle in list(self._watched.values()):
            handle.remove()
        self._watched = WeakIdKeyDictionary()

    # -- backward --------------------------------------------------------------------------------------
    def _enter(self, batch_size: int, where: str) -> tuple[int, _Pass | None]:
        """The running pass's record, created (with its end-of-pass callback) on the pass's first use."""
        task = _autograd_engine.current_graph_task_id()
        if task < 0:  # not inside an engine run (a direct call of a backward function)
            return task, None
        with self._lock:
            rec = self._passes.get(task)
            created = rec is None
            if created:
                rec = self._passes[task] = _Pass(batch_size)
                for old in sorted(self._passes)[:-MAX_OPEN_PASSES]:
                    del self._passes[old]
            elif rec.batch_size is not None and rec.batch_size != batch_size:
                seen, rec.batch_size = rec.batch_size, None  # report once
                raise FlashDPError(
                    f"flashdp: {where} saw a batch of {batch_size} samples but another DP layer in the same backward "
                    f"pass saw {seen}. flashdp takes dim 0 of every DP layer's input as the sample dimension: keep "
                    "inputs batch-first (e.g. batch_first=True) and do not reshape the batch into other dims."
                )
        if created:
            _autograd_engine.queue_callback(lambda: self._end_pass(task))
        return task, rec

    def note_backward(self, batch_size: int, where: str) -> int:
        """Called for every use handed to a group: check the batch size; returns the pass id (-1: none)."""
        return self._enter(batch_size, where)[0]

    def scratch(self, batch_size: int, where: str) -> dict[str, Any]:
        """A dict that lives as long as the running backward pass (a fresh one outside the engine)."""
        rec = self._enter(batch_size, where)[1]
        return rec.scratch if rec is not None else {}

    def defer(self, group: ClipGroup, task: int) -> None:
        """Clip ``group`` when pass ``task`` ends, if its last use has not arrived by then."""
        with self._lock:
            rec = self._passes.get(task)
            if rec is not None and group not in rec.deferred:
                rec.deferred.append(group)

    def _end_pass(self, task: int) -> None:
        with self._lock:
            rec = self._passes.pop(task, None)
        if rec is None:
            return
        rec.scratch.clear()
        late = [g for g in rec.deferred if g.pending_task == task]
        if late and self.sharded:
            for group in late:
                group.pending, group.pending_calls, group.pending_task = [], [], None
            raise FlashDPError(
                f"flashdp: clip group(s) {[g.name for g in late]} were still waiting for the use of a forward call "
                "when the backward pass ended. Under FSDP2 the gradients are reduced by then, so their clipped sums "
                "cannot be completed. Every DP-layer call of a forward must take part in that forward's backward: "
                "run forwards whose outputs you do not backpropagate under torch.no_grad() (or drop their outputs), "
                "and run each forward's backward before the next forward.")
        for group in late:
            group.finalize()


def _outside_dp_hook(name: str):
    def hook(grad: torch.Tensor | None) -> None:
        if grad is None:  # DP layers return no autograd gradient for their parameters
            return
        raise FlashDPError(
            f"flashdp: parameter {name!r} received a gradient from autograd outside a DP layer, which would not be "
            "clipped per sample. Its module (or other code) uses it directly instead of through the module's "
            "forward. Freeze it, or register a DP layer for the code that uses it (flashdp.register_layer)."
        )

    return hook
