"""``make_private``: turn a model's supported modules into DP layers in place, refuse everything else.

Conversion follows the layer registry (:mod:`flashdp.registry`): each matched module's class is swapped
for a DP subclass (``DPLinear`` for ``nn.Linear``, a generated ``DP<Name>`` for Hugging Face classes)
whose forward routes through a DP autograd Function.
Parameters, buffers, ``state_dict`` keys, hooks and ``isinstance`` checks are unchanged, so an optimizer
built before or after sees the same tensors. Modules sharing a trainable parameter (a tied embedding and
LM head) form one clip group. Every trainable parameter also gets a hook that fails loudly if autograd
ever produces a gradient for it outside a DP layer (an unclipped gradient would silently break DP).
The model's :class:`PrivacyState` owns everything that changes while it runs (a
:class:`~flashdp.runtime.Runtime`), so two private models share nothing.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import layers_embedding, layers_linear, layers_norm  # noqa: F401  (their built-in layers register)
from .errors import FlashDPError, ModelChangedError, UnsupportedModuleError
from .groups import ClipGroup
from .registry import find_converter, register_layer, supported_labels
from .runtime import Runtime

__all__ = ["PrivacyState", "make_private", "privacy_state", "register_layer", "state_of_parameter"]

# Which private model each trainable parameter belongs to, so DPOptimizer finds the state from the inner
# optimizer's parameters alone. Weak both ways (a parameter → a weak reference to its state): an entry holds
# nothing alive, and it names one model's state, so models share nothing through it.
_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()
_owner_lock = threading.Lock()


@dataclass(eq=False)
class PrivacyState:
    """What ``make_private`` recorded on the model (``model._flashdp_state``), and the model's running state.

    Attributes:
        max_grad_norm: C.
        groups: the clip groups, in the order of the model's modules.
        param_names: ``id(p) → name`` of every trainable parameter (its first name in ``named_parameters``).
        stream_ids: ``id(p) → i``, the parameter's position among the trainable parameters in
            ``model.named_parameters()`` order (a tied parameter counted once): its noise stream id.
        reduction: ``"mean"`` or ``"sum"``.
        runtime: the forward/backward bookkeeping of this model (:class:`flashdp.runtime.Runtime`).
    """

    max_grad_norm: float
    groups: list[ClipGroup]
    param_names: dict[int, str]
    reduction: str
    runtime: Runtime = field(default_factory=Runtime)
    stream_ids: dict[int, int] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    grads_summed_by_ddp: bool = False  # set by flashdp.DistributedDataParallel: DPOptimizer skips its all-reduce
    model_ref: Callable[[], nn.Module | None] = lambda: None

    def check_unchanged(self) -> None:
        """Raise ModelChangedError if the model has trainable parameters make_private did not see."""
        model = self.model_ref()
        if model is None:
            return
        new = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in self.param_names]
        if new:
            raise ModelChangedError(
                f"flashdp: the model changed after make_private: trainable parameter(s) {new} were not privatised "
                "(a module replaced or added, or a parameter unfrozen). Call flashdp.make_private(model, ...) again "
                "after changing the model, and rebuild the optimizer if it holds the old parameters."
            )


def privacy_state(model: nn.Module) -> PrivacyState | None:
    """The state recorded by make_private on ``model``, or None."""
    return model.__dict__.get("_flashdp_state")


def state_of_parameter(p: torch.Tensor) -> PrivacyState | None:
    """The privacy state of the live private model ``p`` belongs to, or None."""
    with _owner_lock:
        ref = _owner.get(p)
    return ref() if ref is not None else None


def _tied_components(owners: dict[int, list[str]], trainable_mods: list[str]) -> list[list[str]]:
    """Union-find over module paths that share a trainable parameter."""
    parent = {m: m for m in trainable_mods}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for mods in owners.values():
        for m in mods[1:]:
            ra, rb = find(mods[0]), find(m)
            if ra != rb:
                parent[rb] = ra
    comps: dict[str, list[str]] = {}
    for m in trainable_mods:
        comps.setdefault(find(m), []).append(m)
    return list(comps.values())


def make_private(
    model: nn.Module,
    max_grad_norm: float,
    *,
    group_max_grad_norms: Mapping[str, float] | Callable[[str], float | None] | None = None,
    loss_reduction: str = "mean",
) -> nn.Module:
    """Make ``model`` clip each sample's gradient per layer inside backward. In place; returns ``model``.

    After ``loss.backward()``, every trainable ``p.grad`` holds ``Σ_b clip(g_b)``: the sum over samples of
    their per-group clipped gradients (not averaged, no noise). A sample's gradient is its contribution to
    the loss times the batch size (``loss_reduction="mean"``, the gradient of its own loss when the loss is
    a mean over samples) or the contribution as is (``"sum"``). Dim 0 of every DP layer's input is the
    sample dimension.

    Args:
        model: any module whose trainable parameters all live in modules the layer registry matches
            (``flashdp.registry``: nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, Hugging Face Llama-style
            ``*RMSNorm``, GPT-2 ``Conv1D``, OPT's positional embedding, and ``@flashdp.register_layer`` layers).
            Frozen parameters are ignored (LoRA works).
        max_grad_norm: C, the bound on the whole per-sample gradient's norm; each of the L groups gets
            ``C_l = C/√L`` unless overridden.
        group_max_grad_norms: per-group thresholds C_l, by the path of any module in the group (a mapping, or
            a function returning None for the default).
        loss_reduction: ``"mean"`` or ``"sum"``, see above.

    Raises:
        ValueError: max_grad_norm ≤ 0 or a bad per-group threshold or reduction.
        UnsupportedModuleError: lists every module with trainable parameters flashdp cannot clip.
    """
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"flashdp.make_private: max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"flashdp.make_private: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    old = privacy_state(model)
    if old is not None:
        for h in old.hooks:
            h.remove()

    owners: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    for path, mod in model.named_modules():
        names = [n for n, p in mod._parameters.items() if p is not None and p.requires_grad]
        if not names:
            continue
        modules[path] = mod
        for n in names:
            p = mod._parameters[n]
            owners.setdefault(id(p), []).append(path)
            params[id(p)] = p

    converters: dict[str, object] = {}
    bad = []
    for path, mod in modules.items():
        conv = find_converter(mod)
        if conv is None:
            names = [n for n, p in mod._parameters.items() if p is not None and p.requires_grad]
            bad.append((path, type(mod).__name__, names))
        else:
            converters[path] = conv
    if bad:
        raise UnsupportedModuleError(bad, supported_labels())

    comps = _tied_components(owners, list(modules))
    L = len(comps)
    runtime = Runtime()
    groups = []
    for paths in comps:
        gparams: dict[int, torch.Tensor] = {}
        for path in paths:
            for p in modules[path]._parameters.values():
                if p is not None and p.requires_grad:
                    gparams[id(p)] = p
        c_l = max_grad_norm / math.sqrt(L)
        override = _override(group_max_grad_norms, paths)
        if override is not None:
            if not math.isfinite(override) or override <= 0:
                raise ValueError(f"flashdp.make_private: threshold for group {paths} must be > 0, got {override!r}")
            c_l = float(override)
        group = ClipGroup(name="+".join(paths), params=list(gparams.values()), max_norm=c_l, reduction=loss_reduction,
                          runtime=runtime)
        groups.append(group)
        for path in paths:
            mod = modules[path]
            conv = converters[path]
            mod.__dict__["_flashdp_group"] = group
            mod.__dict__["_flashdp_name"] = path or type(mod).__name__
            if isinstance(conv, type):
                mod.__class__ = conv
            else:
                conv(mod)

    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in params:
            names.setdefault(id(p), n)
    streams = {pid: i for i, pid in enumerate(names)}  # dicts keep insertion (named_parameters) order
    state = PrivacyState(max_grad_norm=float(max_grad_norm), groups=groups, param_names=names,
                         reduction=loss_reduction, runtime=runtime, stream_ids=streams, model_ref=weakref.ref(model))
    for pid, p in params.items():
        state.hooks.append(p.register_hook(_outside_dp_hook(names.get(pid, "?"))))
    state.hooks.append(model.register_forward_pre_hook(runtime.forward_pre_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(runtime.forward_hook, always_call=True))
    model.__dict__["_flashdp_state"] = state
    ref = weakref.ref(state)
    with _owner_lock:
        for p in params.values():
            _owner[p] = ref
    return model


def _override(spec, paths: list[str]) -> float | None:
    if spec is None:
        return None
    for path in paths:
        v = spec(path) if callable(spec) else spec.get(path)
        if v is not None:
            return float(v)
    return None


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
