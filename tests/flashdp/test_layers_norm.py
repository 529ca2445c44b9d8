"""DP LayerNorm / RMSNorm (torch and Hugging Face) and Embedding against the float64 per-sample loop."""

import pytest
import torch
from torch import nn

import flashdp


class Wrap(nn.Module):
    def __init__(self, norm, d):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(d, 3)

    def forward(self, x):
        return self.proj(self.norm(x))


def _loss(model, x):
    return model(x).pow(2).flatten(1).sum(1).mean()


def _hf_rms(name, d):
    if name == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        return LlamaRMSNorm(d, eps=1e-5)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    return Qwen2RMSNorm(d, eps=1e-6)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "llama", "qwen2"])
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)], ids=["2d", "3d", "4d"])
def test_norm_layers(ref, kind, shape):
    d = shape[-1]
    if kind == "layernorm":
        norm = nn.LayerNorm(d)
    elif kind == "rmsnorm":
        norm = nn.RMSNorm(d, eps=1e-6)
    else:
        norm = _hf_rms(kind, d)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.3)
    model = Wrap(norm, d)
    B = 5
    x = torch.randn(B, *shape) * 2
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 0.7)
    flashdp.make_private(model, 0.7)
    assert type(model.norm).__name__.startswith("DP")
    _loss(model, x).backward()
    ref.assert_grads_close(model, want)


def test_layernorm_multi_dim_normalized_shape(ref):
    model = Wrap(nn.LayerNorm((3, 4)), 4)
    B = 4
    x = torch.randn(B, 3, 4)
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 0.5)
    flashdp.make_private(model, 0.5)
    _loss(model, x).backward()
    ref.assert_grads_close(model, want)


def test_gemma_style_rmsnorm_takes_the_fallback():
    class GemmaLikeRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))
            self.eps = 1e-6

        def forward(self, x):
            h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)

    with pytest.raises(flashdp.UnsupportedModuleError, match="GemmaLikeRMSNorm"):
        flashdp.make_private(Wrap(GemmaLikeRMSNorm(5), 5), 1.0, fallback=False)
    with pytest.warns(flashdp.FallbackWarning, match="GemmaLikeRMSNorm"):  # exactness: tests/flashdp/test_fallback.py
        flashdp.make_private(Wrap(GemmaLikeRMSNorm(5), 5), 1.0)


class EmbNet(nn.Module):
    def __init__(self, V, d, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=padding_idx)
        self.proj = nn.Linear(d, 2)

    def forward(self, ids):
        return self.proj(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("ids_shape", [(), (9,), (3, 4)], ids=["1d", "2d", "3d"])
def test_embedding(ref, padding_idx, ids_shape):
    V, d, B = 6, 5, 7  # small vocabulary: repeated ids within a sample
    model = EmbNet(V, d, padding_idx)
    ids = torch.randint(0, V, (B, *ids_shape))
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, ids[b:b + 1]), B, 0.4)
    flashdp.make_private(model, 0.4)
    _loss(model, ids).backward()
    ref.assert_grads_close(model, want)
    if padding_idx is not None:
        assert torch.count_nonzero(model.emb.weight.grad[padding_idx]) == 0


def test_tied_embedding_and_head_one_group_with_cross_term(ref):
    class Tied(nn.Module):
        def __init__(self, V=11, d=6):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.mid = nn.Linear(d, d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    B = 6
    model = Tied()
    ids = torch.randint(0, 11, (B, 5))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(ids[b:b + 1]).flatten(0, 1), ids[b].roll(1))  # noqa: E731
    want, norms, groups = ref.per_sample_clipped_sum(model, loss, B, 0.8)
    assert len(groups) == 2
    flashdp.make_private(model, 0.8)
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, dims=1).flatten()).backward()
    ref.assert_grads_close(model, want)
    state = flashdp.privacy_state(model)
    tied = next(g for g in state.groups if "emb" in g.name)
    assert "head" in tied.name
    # the group's per-sample norms are the norms of the summed (embedding + head) gradient, cross term included
    torch.testing.assert_close(tied.last_sq_norms.double().sqrt() * B, torch.tensor([r[0] for r in norms],
                               dtype=torch.float64) if groups[0][0].startswith("emb") else
                               torch.tensor([r[1] for r in norms], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_tied_group_under_reentrant_checkpointing(ref):
    from torch.utils.checkpoint import checkpoint

    class TiedCkpt(nn.Module):
        def __init__(self, V=9, d=6):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.mid = nn.Linear(d, d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            if torch.is_grad_enabled():
                h = checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=True)
            else:
                h = torch.tanh(self.mid(h))
            return self.head(h)

    B = 4
    model = TiedCkpt()
    ids = torch.randint(0, 9, (B, 5))
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: m(ids[b:b + 1]).pow(2).mean(), B, 0.5)
    flashdp.make_private(model, 0.5)
    model(ids).pow(2).mean().backward()
    ref.assert_grads_close(model, want)
