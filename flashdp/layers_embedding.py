"""DP Embedding: per-sample clipping of the embedding table's gradient, which is sparse per sample.

Sample b's gradient puts ``Σ_{t: ids_t = v} G_b[t]`` on row v. Its squared norm sums, over the distinct
(sample, token) pairs, the squared norm of the summed rows: one ``unique`` over ``b·V + id`` and one
``index_add_`` of the B·T gradient rows, O(B·T·d) (no V-sized or T×T temporaries). The clipped sum is one
``index_add_`` of the rows scaled by their sample's factor. ``padding_idx`` rows get no gradient, as in
``nn.Embedding``. Tied with an LM head, the group adds the cross term (see flashdp.groups).
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .groups import Component, Use, grad_buffer
from .layers_common import LayerCall, in_replay, layer_call
from .registry import register_layer

__all__ = ["DPEmbedding", "DPEmbeddingFunction", "EmbeddingUse", "pair_sq_norms_sorted"]


def pair_sq_norms_sorted(keys: Tensor, G: Tensor, V: int, sq: Tensor) -> Tensor:
    """``sq[b] += Σ over distinct (b, v) of ‖Σ_{rows with key b·V + v} G‖²`` without ``torch.unique``: no host
    sync, every size known in advance. A stable sort groups equal keys (in row order, as ``unique``'s inverse
    index does), a running count of key changes numbers the groups, and the rows are summed into a buffer of
    B·T groups (the most there can be; the unused ones stay zero and add nothing)."""
    n, d = G.shape
    order = torch.sort(keys, stable=True)
    first = torch.ones(n, dtype=torch.long, device=keys.device)
    first[1:] = (order.values[1:] != order.values[:-1]).long()
    group = first.cumsum(0) - 1
    rows = torch.zeros(n, d, dtype=torch.float32, device=G.device)
    rows.index_add_(0, group, G.float()[order.indices])
    owner = torch.zeros(n, dtype=torch.long, device=keys.device)
    owner[group] = order.values // V  # each group's rows share their sample: the same value written
    return sq.index_add_(0, owner, rows.square().sum(1))


class EmbeddingUse(Use):
    """ids (B, T) int64, G (B, T, d); the weight (V, d)."""

    def __init__(self, ids: Tensor, G: Tensor, weight: Tensor):
        self.ids, self.G, self.weight = ids, G, weight
        self.batch_size = ids.shape[0]

    def sq_norms(self) -> Tensor:
        B, T = self.ids.shape
        d = self.G.shape[-1]
        V = self.weight.shape[0]
        sq = torch.zeros(B, dtype=torch.float32, device=self.G.device)
        if B * T == 0:
            return sq
        keys = (torch.arange(B, device=self.ids.device)[:, None] * V + self.ids).reshape(-1)
        G = self.G.reshape(-1, d)
        if keys.is_cuda:  # torch.unique would wait for the device to learn its output size: once per backward
            return pair_sq_norms_sorted(keys, G, V, sq)
        uniq, inv = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(uniq.numel(), d, dtype=torch.float32, device=self.G.device)
        rows.index_add_(0, inv, G.float())
        return sq.index_add_(0, uniq // V, rows.square().sum(1))

    def accumulate(self, coef: Tensor) -> None:
        B, T = self.ids.shape
        if B * T == 0:
            grad_buffer(self.weight)
            return
        d = self.G.shape[-1]
        rows = (self.G * coef.to(self.G.dtype).view(B, 1, 1)).reshape(-1, d)
        grad_buffer(self.weight).index_add_(0, self.ids.reshape(-1), rows.to(self.weight.dtype))

    def components(self) -> list[Component]:
        return [Component(self.weight, "factored", left=self.ids, right=self.G)]


class DPEmbeddingFunction(torch.autograd.Function):
    """``F.embedding`` whose backward hands an :class:`EmbeddingUse` to the clip group."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, module: nn.Module, call: LayerCall):
        y = F.embedding(ids, weight, module.padding_idx, module.max_norm, module.norm_type,
                        module.scale_grad_by_freq, module.sparse)
        ctx.save_for_backward(ids)
        ctx.weight_p, ctx.call, ctx.padding_idx = weight, call, module.padding_idx
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        call = ctx.call
        B = call.batch_size
        ids2 = ids.reshape(B, ids.numel() // B if B else 0)
        G = call.flatten(grad_out)
        if ctx.padding_idx is not None:
            G = G * (ids2 != ctx.padding_idx).unsqueeze(-1).to(G.dtype)
        call.add_use(EmbeddingUse(ids2, G, ctx.weight_p))
        return None, None, None, None


@register_layer(nn.Embedding, description="`unique` over (sample, id) plus `index_add_`, O(B·T·d); clipped sum: "
                "`index_add_` of scaled rows; padding_idx respected")
class DPEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose backward clips each sample's gradient (same parameter, same keys)."""

    def forward(self, ids: Tensor) -> Tensor:
        call = layer_call(self, ids, (self.weight,), min_dim=1, allow_broadcast=True)
        if call is None:
            return super().forward(ids)
        if call.broadcast:
            # Broadcast ids (GPT-2's position_ids of shape (1, T)): the output would be broadcast over the batch
            # later, summing the samples' gradients; expand so each sample keeps its own rows.
            ids = ids.expand(call.batch_size, *ids.shape[1:])
        return DPEmbeddingFunction.apply(ids, self.weight, self, call)


# OPT's learned positional embedding computes positions from the attention mask, then calls
# nn.Embedding.forward with batch-first (B, T) ids: its own forward is kept and reaches DPEmbedding's.
register_layer("transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding", DPEmbedding, keep_forward=True,
               label="OPT's learned positional embedding (transformers)",
               description="as nn.Embedding (OPT's own forward computes the positions)")


_DIRECT = r"self\.weight(?!\.(device|dtype|shape))|F\.embedding|\.embedding\("


@functools.cache
def _forward_reaches_embedding(cls: type) -> bool:
    """Whether every ``forward`` override between ``cls`` and nn.Embedding only calls ``super().forward(...)``
    (with ids it computes) and elementwise maths on the result, never the table itself: Gemma's and BART's
    scaled word embeddings (``super().forward(ids) * self.embed_scale``), BART's and BioGPT's learned positions
    (``super().forward(positions + self.offset)``). Read from the source: ``self.weight`` (but for its device,
    dtype or shape) or ``F.embedding`` in a forward means the table is used directly: left to the fallback."""
    for klass in cls.__mro__:
        if klass is nn.Embedding:
            return True
        if "forward" not in vars(klass):
            continue
        try:
            src = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            return False
        if "super().forward(" not in src or re.search(_DIRECT, src):
            return False
    return False


def _is_embedding_subclass_reaching_forward(module: nn.Module) -> bool:
    cls = type(module)
    return isinstance(module, nn.Embedding) and cls.forward is not nn.Embedding.forward and \
        _forward_reaches_embedding(cls)


register_layer(_is_embedding_subclass_reaching_forward, DPEmbedding, keep_forward=True,
               label="nn.Embedding subclasses whose forward computes ids, calls super().forward and scales the result "
               "(Gemma's and BART's scaled embeddings, BART's and BioGPT's learned positions)",
               description="as nn.Embedding (the subclass's own forward runs around it; recognised from its source: "
               "no direct use of the table)")


class DPSharedPositions(DPEmbedding):
    """A learned positional table whose forward looks up one row of positions for the whole batch (Blenderbot's,
    BigBird-Pegasus's ``arange(T)`` of shape (T,)): the (T, d) output is broadcast over the samples later, which
    would sum their gradients. Inside a private model's forward the positions are expanded to (B, T), so each
    sample keeps its own rows; the output is (B, T, d), which broadcasts the same way."""

    def forward(self, ids: Tensor) -> Tensor:
        group = self.__dict__.get("_flashdp_group")
        batch = group.runtime.model_batch() if group is not None else None
        if ids.dim() == 1 and batch is not None and torch.is_grad_enabled() and self.weight.requires_grad \
                and not in_replay():
            ids = ids.expand(batch, ids.shape[0])
        return super().forward(ids)


def _is_shared_positions(module: nn.Module) -> bool:
    return "Positional" in type(module).__name__ and _is_embedding_subclass_reaching_forward(module)


register_layer(_is_shared_positions, DPSharedPositions, keep_forward=True,
               label="learned positional nn.Embedding subclasses whose forward reaches super().forward (Blenderbot's "
               "and BigBird-Pegasus's (T,) positions as well as BART's (B, T) ones)",
               description="as nn.Embedding; one (T,) row of positions shared by the batch is expanded to (B, T) "
               "inside the model's forward, so each sample's gradient keeps its own rows")
