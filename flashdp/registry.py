"""The registry of DP layers: which module classes ``make_private`` converts, and into what.

Built-in and user layers register the same way (Opacus's ``@register_grad_sampler`` pattern)::

    @flashdp.register_layer(MyLayer)
    class DPMyLayer(MyLayer):
        def forward(self, x):
            call = flashdp.layer_call(self, x)
            if call is None:                    # nothing to clip: plain forward
                return super().forward(x)
            return MyLayerFunction.apply(x, self.weight, call)   # backward: call.add_use(MyUse(...))

A registration's *target* is what it matches:

- a class: modules of that class, and of subclasses that do not override ``forward`` (a subclass with its
  own forward is refused unless registered itself, since its forward may use the parameters directly);
- a qualified class name (``"transformers.pytorch_utils.Conv1D"``): the same, without importing the
  class's package;
- a predicate ``module -> bool`` (duck typing, e.g. Hugging Face's many ``*RMSNorm`` classes); tried
  after every class and name registration, newest first. It needs a ``label``.

A registration's *converter* is a class or a function:

- a class (``DPMyLayer`` above): the module's class is swapped in place for the converter itself when
  the module's class is exactly the converter's base, otherwise for a generated ``DP<Name>`` class with
  bases ``(converter, module's class)``, so the converter's forward (a mixin's, too) runs first and
  ``super().forward`` is the original one. With ``keep_forward=True`` the bases are reversed: the
  module's own forward runs and reaches the converter's through ``super()`` (OPT's positional embedding
  computes its positions, then calls ``nn.Embedding.forward``);
- a function ``converter(module) -> None`` that converts the module in place (the module already has
  its clip group as ``module._flashdp_group`` and its path as ``module._flashdp_name``).

The newest registration for a target wins, so a user can replace a built-in (``unregister_layer`` brings
the earlier one back). The registry is process-wide configuration (like Opacus's grad-sampler table); it
holds no state of any model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = ["LayerRegistration", "find_converter", "register_layer", "registrations", "supported_labels",
           "supported_layers_markdown", "unregister_layer"]

Converter = type | Callable[[nn.Module], None]
Target = type | str | Callable[[nn.Module], bool]
C = TypeVar("C")


@dataclass(frozen=True)
class LayerRegistration:
    """One entry of the registry (see the module docstring)."""

    target: Target
    converter: Converter
    label: str
    description: str = ""
    keep_forward: bool = False


_lock = threading.Lock()
_stack: list[LayerRegistration] = []  # every registration, oldest first; the newest one for a target wins
_dp_classes: set[type] = set()  # classes conversion produces: a module of such a class is converted already
_generated: dict[tuple[type, type, bool], type] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _default_label(target: Target) -> str:
    if isinstance(target, type):
        mod = target.__module__
        if mod.startswith("torch.nn"):
            return f"nn.{target.__name__}"
        return _qualname(target)
    if isinstance(target, str):
        return target
    raise ValueError("flashdp.register_layer: a predicate target needs label= (how the error lists it)")


def register_layer(target: Target, converter: Converter | None = None, *, label: str | None = None,
                   description: str = "", keep_forward: bool = False) -> Any:
    """Register the DP implementation of the modules ``target`` matches; usable as a decorator.

    Args:
        target: a module class, a qualified class name (``"pkg.module.Class"``), or a predicate
            ``module -> bool`` (see the module docstring for how each matches).
        converter: a DP class (swapped in as the module's class, or combined with it) or a function
            ``converter(module) -> None``. Omit it to use ``register_layer(target)`` as a decorator of the
            converter, which it returns unchanged.
        label: how errors and docs/flashdp.md name the supported module (default: ``nn.Linear`` style for
            torch classes, the qualified name otherwise); required for a predicate.
        description: one line on how the layer's per-sample gradient is clipped (docs).
        keep_forward: with a class converter, keep the module's own forward and let it reach the converter's
            forward through ``super()`` (for a subclass whose forward calls its base's with batch-first inputs).

    Returns:
        With ``converter``: None. Without: a decorator registering its argument and returning it.

    A converter's forward must run the layer's trainable parameters only through an autograd Function whose
    backward hands a :class:`flashdp.Use` to the clip group; :func:`flashdp.layer_call` does the bookkeeping.
    """
    if not (isinstance(target, (type, str)) or callable(target)):
        raise TypeError(f"flashdp.register_layer: target must be a class, a qualified class name or a predicate, "
                        f"got {target!r}")
    if converter is None:
        def decorator(conv: C) -> C:
            register_layer(target, conv, label=label, description=description, keep_forward=keep_forward)
            return conv

        return decorator
    if not (isinstance(converter, type) or callable(converter)):
        raise TypeError(f"flashdp.register_layer: converter must be a class or a function(module), got {converter!r}")
    if keep_forward and not isinstance(converter, type):
        raise ValueError("flashdp.register_layer: keep_forward=True needs a class converter")
    reg = LayerRegistration(target, converter, label or _default_label(target), description, keep_forward)
    with _lock:
        _stack.append(reg)
        if isinstance(converter, type):
            _dp_classes.add(converter)
    return None


def mark_converted(cls: type) -> None:
    """Record ``cls`` as a class conversion produces (the generic fallback's), so find_converter keeps it."""
    with _lock:
        _dp_classes.add(cls)


def unregister_layer(target: Target) -> LayerRegistration:
    """Remove the newest registration for ``target`` (an earlier one, e.g. the built-in, applies again)."""
    with _lock:
        for i in range(len(_stack) - 1, -1, -1):
            if _same_target(_stack[i].target, target):
                return _stack.pop(i)
    raise KeyError(f"flashdp.registry.unregister_layer: nothing is registered for {target!r}")


def _same_target(a: Target, b: Target) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (type, str)) and a == b)


def registrations() -> list[LayerRegistration]:
    """The registrations in effect (the newest for each target), in the order their targets were registered."""
    with _lock:
        active: dict[int, LayerRegistration] = {}
        firsts: list[Target] = []
        for reg in _stack:
            for j, t in enumerate(firsts):
                if _same_target(t, reg.target):
                    active[j] = reg
                    break
            else:
                active[len(firsts)] = reg
                firsts.append(reg.target)
        return [active[j] for j in range(len(firsts))]


def _lookup_class(cls: type) -> LayerRegistration | None:
    """The newest registration whose target is ``cls`` or its qualified name (call with the lock held)."""
    name = _qualname(cls)
    for reg in reversed(_stack):
        if reg.target is cls or (isinstance(reg.target, str) and reg.target == name):
            return reg
    return None


def find_converter(module: nn.Module) -> Converter | None:
    """The converter for ``module`` (a class to swap in, or a function), or None if no registration matches."""
    cls = type(module)
    with _lock:
        if cls in _dp_classes:
            return cls  # converted already (make_private called again), or a DP class built directly
        for base in cls.__mro__:
            reg = _lookup_class(base)
            if reg is None:
                continue
            if base is cls or cls.forward is base.forward:
                return _converter_for(cls, reg)
            break  # a subclass with its own forward: not covered by its base's registration
        predicates = [r for r in reversed(_stack) if not isinstance(r.target, (type, str))]
    for reg in predicates:
        if reg.target(module):
            with _lock:
                return _converter_for(cls, reg)
    return None


def _converter_for(cls: type, reg: LayerRegistration) -> Converter:
    conv = reg.converter
    if not isinstance(conv, type):
        return conv
    if not reg.keep_forward and conv.__bases__ == (cls,):
        return conv  # the DP class of exactly this class (DPLinear for nn.Linear)
    key = (cls, conv, reg.keep_forward)
    if key not in _generated:
        bases = (cls, conv) if reg.keep_forward else (conv, cls)
        gen = type(f"DP{cls.__name__}", bases, {"__module__": __name__, "__qualname__": f"DP{cls.__name__}"})
        _generated[key] = gen
        _dp_classes.add(gen)
        globals().setdefault(gen.__name__, gen)  # so pickle can find it in this process
    return _generated[key]


def supported_layers_markdown() -> str:
    """The supported-layer table of docs/flashdp.md, generated from the registry."""
    lines = ["| module | how each sample's gradient is clipped |", "|---|---|"]
    for reg in registrations():
        lines.append(f"| {reg.label} | {reg.description or '(registered layer)'} |")
    lines.append("| any other module with trainable parameters (`make_private(..., fallback=True)`, the default) | "
                 "generic exact fallback (flashdp.fallback): the module's forward replayed per sample in backward, "
                 "`vmap(grad)` of ⟨module(x_b; θ), G_b⟩ over its own parameters θ (and those of children whose "
                 "parameters it reads directly, each kept in its child's clip group: flashdp.takeover); B × numel "
                 "fp32 per-sample "
                 "gradients held until the clip (`flashdp.fallback_bytes`); a `FallbackWarning` names the modules |")
    return "\n".join(lines)


def supported_labels() -> list[str]:
    """The labels of every registration, oldest first (for error messages)."""
    return [reg.label for reg in registrations()]
