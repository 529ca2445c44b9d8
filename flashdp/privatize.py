"""``make_private``: turn a model's supported modules into DP layers in place, refuse everything else.

Conversion follows the layer registry (:mod:`flashdp.registry`): each matched module's class is swapped
for a DP subclass (``DPLinear`` for ``nn.Linear``, a generated ``DP<Name>`` for Hugging Face classes)
whose forward routes through a DP autograd Function.
Parameters, buffers, ``state_dict`` keys, hooks and ``isinstance`` checks are unchanged, so an optimizer
built before or after sees the same tensors. Modules sharing a trainable parameter (a tied embedding and
LM head) form one clip group. Every trainable parameter (and every tensor a DP layer later runs with, such
as FSDP2's unsharded parameters) gets a hook that fails loudly if autograd ever produces a gradient for it
outside a DP layer (an unclipped gradient would silently break DP). Parameters are recorded by name and by
``(module, attribute)`` and looked up when used, so sharding with FSDP2 before or after works.
The model's :class:`PrivacyState` owns everything that changes while it runs (a
:class:`~flashdp.runtime.Runtime`), so two private models share nothing.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import dispatch, fsdp, layers_embedding, layers_linear, layers_norm  # noqa: F401  (built-ins register)
from .errors import FallbackWarning, ModelChangedError, UnsupportedModuleError
from .fallback import fallback_class
from .groups import ClipGroup
from .registry import find_converter, register_layer, supported_labels
from .runtime import Runtime
from .takeover import directly_read_children, known_take_overs

__all__ = ["PrivacyState", "make_private", "privacy_state", "register_layer", "state_of_parameter"]

# Which private model each trainable parameter belongs to, so DPOptimizer finds the state from the inner
# optimizer's parameters alone. Weak both ways (a parameter → a weak reference to its state): an entry holds
# nothing alive, and it names one model's state, so models share nothing through it. Parameters swapped in after
# make_private (FSDP2's sharded ones) are found through _states, the live states, and then added here.
_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()
_states: weakref.WeakSet = weakref.WeakSet()
_owner_lock = threading.Lock()


@dataclass(eq=False)
class PrivacyState:
    """What ``make_private`` recorded on the model (``model._flashdp_state``), and the model's running state.

    Parameters are recorded by name (``model.named_parameters()``), and the tensors are looked up when needed:
    FSDP2 replaces every parameter by a sharded one (and swaps an unsharded one in during forward and backward)
    under the same name, so everything keyed here follows it.

    Attributes:
        max_grad_norm: C.
        groups: the clip groups, in the order of the model's modules.
        names: the trainable parameters' names in ``model.named_parameters()`` order, a tied parameter once
            (its first name); a parameter's position here is its noise stream id.
        reduction: ``"mean"`` or ``"sum"``.
        runtime: the forward/backward bookkeeping of this model (:class:`flashdp.runtime.Runtime`).
    """

    max_grad_norm: float
    groups: list[ClipGroup]
    names: list[str]
    reduction: str
    runtime: Runtime = field(default_factory=Runtime)
    hooks: list = field(default_factory=list)
    grads_summed_by_ddp: bool = False  # set by flashdp.DistributedDataParallel: DPOptimizer skips its all-reduce
    model_ref: Callable[[], nn.Module | None] = lambda: None
    stream_of: dict[str, int] = field(init=False)
    threshold_of: dict[str, float] = field(init=False)
    kernel_devices: set[torch.device] = field(default_factory=set)  # CUDA devices the "once" kernel was built for

    def __post_init__(self) -> None:
        self.stream_of = {n: i for i, n in enumerate(self.names)}
        self.threshold_of = {n: g.max_norm for g in self.groups for n in g.param_names}

    def __deepcopy__(self, memo: dict) -> PrivacyState:
        """A copied model's state: its groups name the copied modules, a fresh Runtime, the same settings."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        model = self.model_ref()
        for k, v in self.__dict__.items():
            if k != "model_ref":
                object.__setattr__(new, k, copy.deepcopy(v, memo))
        twin = copy.deepcopy(model, memo) if model is not None else None
        new.model_ref = weakref.ref(twin) if twin is not None else (lambda: None)
        _own(new, ())
        return new

    def forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Root pre-hook: configure FSDP2 units applied since (fully_shard after make_private), build the CUDA
        "once" kernel before the first backward on a new device, record the batch."""
        fsdp.configure(self)
        if torch.is_grad_enabled():
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
            dispatch.prepare_once_kernel(first.device if first is not None else None, self.kernel_devices)
        self.runtime.forward_pre_hook(module, args, kwargs)

    def parameters(self) -> dict[str, torch.Tensor]:
        """``name → tensor`` of the trainable parameters the model holds now (the sharded ones under FSDP2)."""
        model = self.model_ref()
        if model is None:
            return {}
        return {n: p for n, p in model.named_parameters() if n in self.stream_of}

    @property
    def param_names(self) -> dict[int, str]:
        """``id(p) → name`` of the trainable parameters the model holds now."""
        return {id(p): n for n, p in self.parameters().items()}

    @property
    def stream_ids(self) -> dict[int, int]:
        """``id(p) → noise stream id`` of the trainable parameters the model holds now."""
        return {id(p): self.stream_of[n] for n, p in self.parameters().items()}

    def check_unchanged(self) -> None:
        """Raise ModelChangedError if the model has trainable parameters make_private did not convert."""
        model = self.model_ref()
        if model is None:
            return
        mine = {id(g) for g in self.groups}
        new = []
        for path, mod in model.named_modules():
            group = mod.__dict__.get("_flashdp_group")
            known = mod.__dict__.get("_flashdp_param_names", {}) if id(group) in mine else {}
            known = {*known, *mod.__dict__.get("_flashdp_delegated", ())}
            new += [f"{path}.{a}" if path else a for a, p in mod._parameters.items()
                    if p is not None and p.requires_grad and a not in known]
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
    """The privacy state of the live private model ``p`` belongs to now, or None."""
    with _owner_lock:
        ref = _owner.get(p)
        states = list(_states)
    if ref is not None and ref() is not None:
        return ref()
    for state in states:  # a parameter swapped in after make_private (fully_shard applied afterwards)
        params = state.parameters()
        if any(q is p for q in params.values()):
            _own(state, params.values())
            return state
    return None


def _own(state: PrivacyState, params) -> None:
    ref = weakref.ref(state)
    with _owner_lock:
        for p in params:
            _owner[p] = ref
        _states.add(state)


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
    fallback: bool = True,
) -> nn.Module:
    """Make ``model`` clip each sample's gradient per layer inside backward. In place; returns ``model``.

    After ``loss.backward()``, every trainable ``p.grad`` holds ``Σ_b clip(g_b)``: the sum over samples of
    their per-group clipped gradients (not averaged, no noise). A sample's gradient is its contribution to
    the loss times the batch size (``loss_reduction="mean"``, the gradient of its own loss when the loss is
    a mean over samples) or the contribution as is (``"sum"``). Dim 0 of every DP layer's input is the
    sample dimension.

    Args:
        model: any module. Trainable parameters in modules the layer registry matches (``flashdp.registry``:
            nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, Hugging Face Llama-style ``*RMSNorm``, GPT-2
            ``Conv1D``, OPT's positional embedding, ``@flashdp.register_layer`` layers) take the fused paths;
            any other module's own trainable parameters take the generic fallback (see ``fallback``).
            Frozen parameters are ignored (LoRA works).
        max_grad_norm: C, the bound on the whole per-sample gradient's norm; each of the L groups gets
            ``C_l = C/√L`` unless overridden.
        group_max_grad_norms: per-group thresholds C_l, by the path of any module in the group (a mapping, or
            a function returning None for the default).
        loss_reduction: ``"mean"`` or ``"sum"``, see above.
        fallback: clip modules no registered layer matches with the generic exact fallback
            (:mod:`flashdp.fallback`: torch.func per-sample gradients, B × numel memory, a
            :class:`FallbackWarning` naming them); ``False`` refuses them instead.

    A parameter owned by a module and by one of its submodules (Hugging Face's ``decoder.bias = self.bias``
    tying) belongs to the submodule: the owner's forward reaching it directly would raise in backward.

    Raises:
        ValueError: max_grad_norm ≤ 0 or a bad per-group threshold or reduction.
        UnsupportedModuleError: with ``fallback=False``, lists every module with trainable parameters no
            registered layer matches.
    """
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"flashdp.make_private: max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"flashdp.make_private: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    old = privacy_state(model)
    if old is not None:
        for h in old.hooks:
            h.remove()
        old.runtime.unwatch_all()

    owners: dict[int, list[str]] = {}
    all_mods = dict(model.named_modules())
    for path, mod in all_mods.items():
        for p in mod._parameters.values():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(path)
    delegated: dict[str, set[str]] = {}  # an owner that also reaches the parameter through its submodule
    for pid, paths in owners.items():
        keep = [a for a in paths if not any(_is_ancestor(a, b) for b in paths)]
        for a in set(paths) - set(keep):
            attrs = all_mods[a]._parameters.items()
            delegated.setdefault(a, set()).update(n for n, p in attrs if p is not None and id(p) == pid)
        owners[pid] = keep
    own: dict[str, list[str]] = {}  # path → its trainable attributes (a delegated one excluded)
    for path, mod in all_mods.items():
        names = [n for n, p in mod._parameters.items() if p is not None and p.requires_grad
                 and n not in delegated.get(path, ())]
        if names:
            own[path] = names
    modules = {path: all_mods[path] for path in own}

    taken = _take_overs(all_mods, own) if fallback else {}
    converters: dict[str, object] = {}
    bad = []
    fell_back = []
    for path, mod in modules.items():
        conv = None if path in taken else find_converter(mod)  # a parent taking over a child: the fallback
        if conv is None and fallback:
            conv = fallback_class(type(mod))
            fell_back.append((path or "<root>", type(mod).__name__, sum(mod._parameters[a].numel() for a in own[path])))
        if conv is None:
            bad.append((path, type(mod).__name__, own[path]))
        else:
            converters[path] = conv
    if bad:
        raise UnsupportedModuleError(bad, supported_labels())
    fell_back += [(path or "<root>", type(all_mods[path]).__name__, 0) for path in taken if path not in modules]
    fell_back = [(p, c, n + sum(all_mods[path].get_parameter(k).numel() for k in taken.get(path, ())))
                 for p, c, n in fell_back for path in [p if p != "<root>" else ""]]
    if fell_back:
        listed = ", ".join(f"{p} ({c}, {n} parameters)" for p, c, n in fell_back)
        if taken:
            listed += "; taken over from children their forward reads directly (each stays in its child's clip " \
                      "group): " + ", ".join(f"{p or '<root>'}: {', '.join(keys)}" for p, keys in taken.items())
        warnings.warn(
            f"flashdp.make_private: no fused DP layer matches {len(fell_back)} module(s) with trainable parameters; "
            f"they use the generic exact fallback (torch.func per-sample gradients; per backward: one more forward of "
            f"the module and B x numel per-sample gradient elements held until the clip): {listed}. "
            "flashdp.fallback_bytes(model, batch_size) gives the memory; register a DP layer to avoid it.",
            FallbackWarning, stacklevel=2)

    first_name: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            first_name.setdefault(id(p), n)
    comps = _tied_components(owners, list(modules))
    L = len(comps)
    runtime = Runtime()
    groups = []
    for paths in comps:
        members = [(modules[path], a) for path in paths for a in own[path]]
        gnames = list(dict.fromkeys(first_name[id(mod._parameters[a])] for mod, a in members))
        c_l = max_grad_norm / math.sqrt(L)
        override = _override(group_max_grad_norms, paths)
        if override is not None:
            if not math.isfinite(override) or override <= 0:
                raise ValueError(f"flashdp.make_private: threshold for group {paths} must be > 0, got {override!r}")
            c_l = float(override)
        group = ClipGroup(name="+".join(paths), members=members, param_names=gnames, max_norm=c_l,
                          reduction=loss_reduction, runtime=runtime)
        groups.append(group)
        for path in paths:
            mod = modules[path]
            conv = converters[path]
            mod.__dict__["_flashdp_group"] = group
            mod.__dict__["_flashdp_name"] = path or type(mod).__name__
            mod.__dict__["_flashdp_param_names"] = {a: first_name[id(mod._parameters[a])] for a in own[path]}
            mod.__dict__["_flashdp_watched"] = {}  # the new runtime watches afresh (make_private called again)
            if isinstance(conv, type):
                mod.__class__ = conv
            else:
                conv(mod)

    state = PrivacyState(max_grad_norm=float(max_grad_norm), groups=groups, names=list(first_name.values()),
                         reduction=loss_reduction, runtime=runtime, model_ref=weakref.ref(model))
    for path, keys in taken.items():
        mod = all_mods[path]
        mod.__dict__["_flashdp_taken"] = list(keys)
        if path not in modules:  # no parameters of its own: a fallback module for its children's only
            mod.__dict__["_flashdp_name"] = path or type(mod).__name__
            mod.__dict__["_flashdp_param_names"] = {}
            mod.__class__ = fallback_class(type(mod))
    for mod in modules.values():
        runtime.watch(mod)
    state.hooks.append(model.register_forward_pre_hook(state.forward_pre_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(runtime.forward_hook, always_call=True))
    for path, attrs in delegated.items():
        all_mods[path].__dict__["_flashdp_delegated"] = set(attrs)
    model.__dict__["_flashdp_state"] = state
    _own(state, state.parameters().values())
    fsdp.configure(state)  # a model sharded with FSDP2 already (make_private after fully_shard)
    return model


def _take_overs(all_mods: dict[str, nn.Module], own: dict[str, list[str]]) -> dict[str, list[str]]:
    """``parent path → ["child.attr", ...]``: the child parameters each module's forward reads directly
    (:mod:`flashdp.takeover`), which its fallback replay differentiates in the child's stead; for the parents
    ``takeover.KNOWN`` lists, every trainable parameter in the named children's subtrees."""
    out: dict[str, list[str]] = {}
    for path, mod in all_mods.items():
        kids = {c: own[f"{path}.{c}" if path else c] for c, ch in mod._modules.items()
                if ch is not None and (f"{path}.{c}" if path else c) in own}
        keys = [f"{c}.{a}" for c in (directly_read_children(mod, kids) if kids else ()) for a in kids[c]]
        for c in known_take_overs(mod):
            base = f"{path}.{c}" if path else c
            keys += [f"{c}{sub[len(base):]}.{a}" for sub, attrs in own.items()
                     if sub == base or sub.startswith(base + ".") for a in attrs]
        if keys:
            out[path] = list(dict.fromkeys(keys))
    return out


def _is_ancestor(a: str, b: str) -> bool:
    """Whether module path ``a`` is a strict ancestor of ``b`` (``""`` is the root)."""
    return a != b and (a == "" or b.startswith(a + "."))


def _override(spec, paths: list[str]) -> float | None:
    if spec is None:
        return None
    for path in paths:
        v = spec(path) if callable(spec) else spec.get(path)
        if v is not None:
            return float(v)
    return None
