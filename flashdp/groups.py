"""Clip groups: the unit of per-sample clipping, and how the uses of a group in one backward pass meet.

A group is a set of parameters clipped together with one threshold ``C_l`` (a module's weight and bias;
a weight tied across modules and everything those modules own). Each call of a DP layer's forward is a
*use* of its group; in backward each use hands the group an object (:class:`Use`) that can give the
per-sample squared norm of its contribution, its pieces for cross terms, and accumulate a clipped sum.

- A group used once per backward (the common case) clips immediately inside that layer's backward: the
  layer's fused path computes norms, factors and the clipped sum (possibly in a single pass).
- A group used several times (tied embedding ↔ LM head, a module called twice) must see every use
  before any is clipped: ``‖Σ_u g_u‖² = Σ_u ‖g_u‖² + 2 Σ_{u<v} ⟨g_u, g_v⟩``. The group counts its
  uses in forward and defers the earlier uses until the last one arrives; the cross terms come from
  T×T Gram products of the factored forms (``g = Lᵀ R``), so no per-sample gradient is materialised.
  Anything still pending when the backward pass ends is flushed by an engine callback (the group's
  :class:`~flashdp.runtime.Runtime`, shared by the groups of one private model, keeps that bookkeeping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memtrain.kernels.dp_clip_accumulate import clip_factors

from .errors import FlashDPError
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
    raise FlashDPError(
        "flashdp: a parameter is used both as a dense and as a factored (matrix) weight in one backward pass; "
        "cross terms between these forms are not implemented. Untie the parameter or freeze it."
    )


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
        sq = self.sq_norms()
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
    """Parameters clipped together per sample with threshold ``max_norm`` (C_l)."""

    name: str
    params: list[Tensor]
    max_norm: float = math.inf
    reduction: str = "mean"
    runtime: Runtime = field(default_factory=Runtime)
    expected_uses: int = 0
    pending: list[Use] = field(default_factory=list)
    pending_task: int | None = None  # the backward pass the pending uses belong to
    last_sq_norms: Tensor | None = None

    def note_forward(self) -> None:
        """Called by a DP layer's forward when it will take part in a backward pass."""
        self.expected_uses += 1

    def add_use(self, use: Use, where: str) -> None:
        """Called by a DP layer's backward; clips now, or later once every use of the pass has arrived."""
        task = self.runtime.note_backward(use.batch_size, where)
        if self.pending and self.pending_task != task:
            # uses left by a backward pass that raised before its end: void (that pass produced no step)
            self.pending = []
        self.pending.append(use)
        self.pending_task = task
        if len(self.pending) >= max(self.expected_uses, 1):
            self.finalize()
        else:
            self.runtime.defer(self, task)

    def finalize(self) -> None:
        """Clip and accumulate every pending use together (the end of the group's part of a backward pass)."""
        uses, self.pending, self.pending_task = self.pending, [], None
        if not uses:
            return
        self.expected_uses = max(0, self.expected_uses - len(uses))
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
        sq = sum(u.sq_norms() for u in uses)
        comps = [u.components() for u in uses]
        for i in range(len(uses)):
            for j in range(i + 1, len(uses)):
                for a in comps[i]:
                    for b in comps[j]:
                        if a.param is b.param:
                            sq = sq + 2 * inner(a, b)
        coef = clip_factors(sq, self.max_norm, scale)
        for u in uses:
            u.accumulate(coef)
        self.last_sq_norms = sq

