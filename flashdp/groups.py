"""Clip groups: the unit of per-sample clipping, and how the uses of a group in one backward pass meet.

A group is a set of parameters clipped together with one threshold ``C_l`` (a module's weight and bias;
a weight tied across modules and everything those modules own). Each call of a DP layer's forward is a
*use* of its group; in backward each use hands the group an object (:class:`Use`) that can give the
per-sample squared norm of its contribution, its pieces for cross terms, and accumulate a clipped sum.

- A group used once per backward (the common case) clips immediately inside that layer's backward: the
  layer's fused path computes norms, factors and the clipped sum (possibly in a single pass).
- A group used several times (tied embedding ↔ LM head, a module called twice) must see every use
  before any is clipped: ``‖Σ_u g_u‖² = Σ_u ‖g_u‖² + 2 Σ_{u<v} ⟨g_u, g_v⟩``. The group keeps a weak
  reference to each forward call of its layers (the call lives in the autograd graph, so it is gone once
  the graph is freed: a forward whose output was dropped without a backward does not count) and defers
  the earlier uses until every live call has handed in its use; the cross terms come from T×T Gram
  products of the factored forms (``g = Lᵀ R``), so no per-sample gradient is materialised. Anything
  still pending when the backward pass ends is flushed by an engine callback (the group's
  :class:`~flashdp.runtime.Runtime`, shared by the groups of one private model, keeps that bookkeeping).

A group names its parameters by ``(module, attribute)``, not by tensor: wrappers such as FSDP2 swap the
tensor behind a module attribute (a sharded parameter at rest, an unsharded one during forward and
backward), and :attr:`ClipGroup.params` resolves the tensors in place now.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

import torch
from torch import Tensor, nn

from memtrain.kernels.dp_clip_accumulate import clip_factors

from .errors import FlashDPError
from .profiling import CLIPPED_SUM, NORMS, region
from .runtime import Runtime

__all__ = ["ClipGroup", "Component", "Use", "batch_scale"]


@dataclass
class Component:
    """One parameter's per-sample gradients in a form that supports inner products.

    ``kind="dense"``: ``data`` is (B, *param.shape). ``kind="factored"``: the gradient of sample b is
    ``left_bᵀ right_b`` with ``left`` (B, T, P) dense or (B, T) int64 row indices (one-hot, an embedding)
    and ``right`` (B, T, Q); the parameter has shape (P, Q).
    """

    param: Tensor
    kind: str
    data: Tensor | None = None
    left: Tensor | None = None
    right: Tensor | None = None


def _left_gram(l1: Tensor, l2: Tensor) -> Tensor:
    """(B, T1, T2) matrix of ⟨l1_t, l2_s⟩ for dense or one-hot (index) left factors."""
    i1 = not l1.is_floating_point()
    i2 = not l2.is_floating_point()
    if i1 and i2:
        return (l1[:, :, None] == l2[:, None, :]).float()
    if i1:
        return _left_gram(l2, l1).transpose(1, 2)
    if i2:  # ⟨l1_t, e_{l2_s}⟩ = l1[t, l2_s]
        return l1.float().gather(2, l2[:, None, :].expand(-1, l1.shape[1], -1))
    return torch.bmm(l1.float(), l2.float().transpose(1, 2))


def inner(c1: Component, c2: Component) -> Tensor:
    """Per-sample inner products ⟨grad1_b, grad2_b⟩, (B,) fp32; both components of one parameter."""
    if c1.kind == "dense" and c2.kind == "dense":
        return (c1.data.float() * c2.data.float()).flatten(1).sum(1)
    if c1.kind == "factored" and c2.kind == "factored":
        lg = _left_gram(c1.left, c2.left)
        rg = torch.bmm(c1.right.float(), c2.right.float().transpose(1, 2))
        return (lg * rg).sum((1, 2))
    dense, fac = (c1, c2) if c1.kind == "dense" else (c2, c1)
    B = dense.data.shape[0]
    if fac.right.dim() != 3 or dense.data.numel() != B * fac.param.numel() or fac.param.dim() != 2:
        raise FlashDPError(
            "flashdp: a parameter is used both as a dense and as a factored (matrix) weight in one backward pass "
            f"with shapes that do not match ({tuple(dense.data.shape)} vs {tuple(fac.param.shape)}). Untie the "
            "parameter or freeze it."
        )
    D = dense.data.float().reshape(B, *fac.param.shape)  # (B, P, Q); factored: grad_b = left_bᵀ right_b
    if fac.left.is_floating_point():  # Σ_t left_b[t]ᵀ D_b right_b[t]
        return torch.einsum("btp,bpq,btq->b", fac.left.float(), D, fac.right.float())
    rows = D.gather(1, fac.left[:, :, None].expand(-1, -1, D.shape[2]))  # D_b[ids_b[t], :]
    return (rows * fac.right.float()).sum((1, 2))


class Use:
    """What a DP layer's backward hands its group. Subclasses implement the three methods."""

    batch_size: int

    def sq_norms(self) -> Tensor:
        """(B,) fp32 squared norms of the raw per-sample gradients of this use (before the loss scale)."""
        raise NotImplementedError

    def accumulate(self, coef: Tensor) -> None:
        """Add ``Σ_b coef_b · raw_grad_b`` to the parameters' ``.grad``."""
        raise NotImplementedError

    def components(self) -> list[Component]:
        """Per-parameter forms for cross terms with other uses of the same group."""
        raise NotImplementedError

    def clip_and_accumulate(self, max_norm: float, scale: float) -> Tensor:
        """Single-use fast path: clip with threshold ``max_norm`` and accumulate; return raw squared norms."""
        return self.norms_then_clip(self.sq_norms, max_norm, scale)

    def norms_then_clip(self, sq_norms: Callable[[], Tensor], max_norm: float, scale: float) -> Tensor:
        """``sq_norms()``, then the clipped sum with those norms, each in its profiler region; returns the norms."""
        with region(NORMS):
            sq = sq_norms()
        with region(CLIPPED_SUM):
            self.accumulate(clip_factors(sq, max_norm, scale))
        return sq


def grad_buffer(p: Tensor) -> Tensor:
    """``p.grad``, created as zeros when absent (DP layers accumulate into it)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def batch_scale(batch_size: int, reduction: str = "mean") -> float:
    """Factor from a raw per-sample gradient to the sample's gradient (DESIGN: scaled by the batch size).

    ``"mean"``: the loss averages over samples, so a sample's gradient is B times its contribution;
    ``"sum"``: the contribution as is.
    """
    return float(batch_size) if reduction == "mean" else 1.0


@dataclass(eq=False)
class ClipGroup:
    """Parameters clipped together per sample with threshold ``max_norm`` (C_l).

    Args:
        name: the paths of the group's modules joined by ``+``.
        members: ``(module, attribute)`` of each trainable parameter (a tied parameter once per module); kept
            as weak references to the modules (the model owns its groups, not the other way round).
        param_names: the parameters' names in the model (``named_parameters``, tied ones once).
    """

    name: str
    members: InitVar[list[tuple[nn.Module, str]]]
    param_names: list[str] = field(default_factory=list)
    max_norm: float = math.inf
    reduction: str = "mean"
    runtime: Runtime = field(default_factory=Runtime)
    pending: list[Use] = field(default_factory=list)
    pending_calls: list[object] = field(default_factory=list)  # the forward call of each pending use
    pending_task: int | None = None  # the backward pass the pending uses belong to
    last_sq_norms: Tensor | None = None
    calls: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # live forward calls (see the module doc)
    _members: list[tuple[weakref.ref, str]] = field(init=False, default_factory=list)

    def __post_init__(self, members: list[tuple[nn.Module, str]]) -> None:
        self._members = [(weakref.ref(m), a) for m, a in members]

    def __deepcopy__(self, memo: dict) -> ClipGroup:
        """A copied model's group: the copied modules, a fresh Runtime and no pass in progress."""
        new = ClipGroup(self.name, [], list(self.param_names), self.max_norm, self.reduction,
                        copy.deepcopy(self.runtime, memo))
        memo[id(self)] = new  # before the modules: they refer to their group
        new._members = [(weakref.ref(copy.deepcopy(m, memo)), a) for m, a in self.modules()]
        return new

    def modules(self) -> list[tuple[nn.Module, str]]:
        """``(module, attribute)`` of each member whose module is alive."""
        return [(m, a) for m, a in ((r(), a) for r, a in self._members) if m is not None]

    @property
    def params(self) -> list[Tensor]:
        """The tensors the members hold now, each once (under FSDP2: the sharded ones at rest, the unsharded ones
        during forward and backward)."""
        out: dict[int, Tensor] = {}
        for mod, attr in self.modules():
            p = mod._parameters.get(attr)
            if p is not None:
                out.setdefault(id(p), p)
        return list(out.values())

    def note_forward(self, call: object) -> None:
        """Called by a DP layer's forward (with its call, kept by the autograd graph) when it will take part in a
        backward pass: the group waits for the use of every such call still alive before clipping."""
        self.calls.add(call)

    def add_use(self, use: Use, where: str, call: object = None) -> None:
        """Called by a DP layer's backward; clips now, or later once every live call has handed in its use."""
        task = self.runtime.note_backward(use.batch_size, where)
        if self.pending and self.pending_task != task:
            # uses left by a backward pass that raised before its end: void (that pass produced no step)
            self.pending, self.pending_calls = [], []
        self.pending.append(use)
        self.pending_calls.append(call)
        self.pending_task = task
        arrived = {id(c) for c in self.pending_calls}
        if all(id(c) in arrived for c in list(self.calls)):
            self.finalize()
        else:
            self.runtime.defer(self, task)

    def finalize(self) -> None:
        """Clip and accumulate every pending use together (the end of the group's part of a backward pass)."""
        uses, self.pending, self.pending_calls, self.pending_task = self.pending, [], [], None
        if not uses:
            return
        sizes = {u.batch_size for u in uses}
        if len(sizes) != 1:
            raise FlashDPError(
                f"flashdp: clip group {self.name!r} was used with different batch sizes {sorted(sizes)} in one "
                "backward pass; run one backward per batch"
            )
        scale = batch_scale(uses[0].batch_size, self.reduction)
        if len(uses) == 1:
            self.last_sq_norms = uses[0].clip_and_accumulate(self.max_norm, scale)
            return
        with region(NORMS):
            sq = sum(u.sq_norms() for u in uses)
            comps = [u.components() for u in uses]
            for i in range(len(uses)):
                for j in range(i + 1, len(uses)):
                    for a in comps[i]:
                        for b in comps[j]:
                            if a.param is b.param:
                                sq = sq + 2 * inner(a, b)
        with region(CLIPPED_SUM):
            coef = clip_factors(sq, self.max_norm, scale)
            for u in uses:
                u.accumulate(coef)
        self.last_sq_norms = sq

