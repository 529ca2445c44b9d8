"""Which modules read a child's parameters directly, so that the generic fallback takes their computation over.

Many mixers use a child module's parameters without calling the child: Mamba's ``self.dt_proj.bias`` and
``self.dt_proj.weight @ …``, Qwen3-Next's and LFM's ``causal_conv1d(…, self.conv1d, …)`` (the child handed to a
function that reads ``conv1d.weight``), ProphetNet's ``self.ngram_embeddings.weight``. Such a use runs outside the
child's DP layer, so the child cannot clip it. The parent then *takes over* the child: the parent becomes a
fallback module (:mod:`flashdp.fallback`) whose per-sample replay differentiates the child's parameters too, and
hands each parameter's per-sample gradient to the child's own clip group. Clip groups do not change.

Read from the source of the parent's class: the methods ``forward`` reaches through ``self.<method>(`` calls (not
``__init__`` or weight initialisation), looking for ``self.<child>.<parameter>`` and for ``self.<child>`` passed as
a value (a call argument or an assignment). This over-approximates (a branch that only runs on CUDA counts, and so
does a comparison that takes no gradient): a child taken over needlessly is still clipped exactly, at the
fallback's cost. A direct use the scan misses (a child reached through ``getattr``) is not silent: the parameter's
outside-DP hook refuses the gradient in backward (:mod:`flashdp.runtime`).
"""

from __future__ import annotations

import functools
import inspect
import re
import textwrap

from torch import nn

__all__ = ["KNOWN", "directly_read_children", "known_take_overs"]

# Parents whose children see the batch in another layout than sample-major rows, so that only a per-sample replay
# of the parent separates the samples: ``qualified class name → children taken over whole (their subtrees)``.
KNOWN: dict[str, tuple[str, ...]] = {
    # experts over the tokens repeated expert-major, (E·B·T, d)
    "transformers.models.llama4.modeling_llama4.Llama4TextMoe": ("experts",),
    # experts over the tokens sorted by expert, with per-expert counts over the whole batch
    "transformers.models.jetmoe.modeling_jetmoe.JetMoeMoE": ("input_linear", "output_linear"),
    # the attention calls its experts' map/reduce (not forward), over tokens sorted by expert
    "transformers.models.jetmoe.modeling_jetmoe.JetMoeAttention": ("experts",),
}

# a parameter read, but not for its metadata, nor in a comparison (no gradient flows through ``==``)
_ATTR = re.compile(r"(==\s*|!=\s*)?self\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?!\w|\.(?:dtype|device|shape|ndim|is_cuda)\b)")
_VALUE = re.compile(r"(?:[(,=]|\breturn)\s*self\.([A-Za-z_]\w*)\s*(?=[,)\n]|$)", re.M)
_CALL = re.compile(r"self\.([A-Za-z_]\w*)\s*\(")
_RETURN = re.compile(r"^\s*return\b(.*)$", re.M)
_SELF_ITEM = re.compile(r"self\.([A-Za-z_]\w*)")


def _method_source(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return ""
        fn = vars(klass).get(name)
        if fn is not None:
            try:
                return textwrap.dedent(inspect.getsource(fn))
            except (OSError, TypeError):
                return ""
    return ""


@functools.cache
def _reads(cls: type) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """``({(child, attribute)}, {child passed as a value})`` in the methods ``cls.forward`` reaches."""
    attrs: set[tuple[str, str]] = set()
    values: set[str] = set()
    todo, seen = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in seen or "init" in name:
            continue
        seen.add(name)
        src = _method_source(cls, name)
        attrs.update((c, a) for cmp, c, a in _ATTR.findall(src) if not cmp)
        values.update(_VALUE.findall(src))
        todo.extend(m for m in _CALL.findall(src) if callable(getattr(cls, m, None)))
    return frozenset(attrs), frozenset(values)


@functools.cache
def _returned(cls: type) -> frozenset[str]:
    """Attributes ``cls.forward`` returns as they are (``return out, self.dense_bias``)."""
    found: set[str] = set()
    for ret in _RETURN.findall(_method_source(cls, "forward")):
        for item in _top_level_items(ret):
            m = _SELF_ITEM.fullmatch(item)
            if m:
                found.add(m.group(1))
    return frozenset(found)


def known_take_overs(module: nn.Module) -> tuple[str, ...]:
    """The children :data:`KNOWN` lists for ``module``'s class (or a base class), else ``()``."""
    for klass in type(module).__mro__:
        found = KNOWN.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return ()


def _top_level_items(expr: str) -> list[str]:
    """The comma-separated items of a returned expression (``(a, self.b)`` → ``["a", "self.b"]``), stripped."""
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1]
    items, depth, cur = [], 0, ""
    for ch in expr:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*items, cur.strip()]


def directly_read_children(module: nn.Module, trainable: dict[str, list[str]]) -> list[str]:
    """Names of ``module``'s children whose trainable parameters ``module``'s forward may use without their clip:
    read directly (``self.child.weight``, the child handed to a function), or returned by the child's own forward
    (GPT-NeoX-Japanese's attention returns its ``dense_bias`` for its caller to add, broadcast over the batch).

    Args:
        module: a module of the model.
        trainable: ``child name → the child's own trainable attributes`` (children owning none are left out).
    """
    attrs, values = _reads(type(module))
    kids = module._modules
    return [c for c, own in trainable.items() if c in values or any((c, a) in attrs for a in own)
            or any(a in _returned(type(kids[c])) for a in own)]
