"""The generic fallback (flashdp.fallback) against the independent per-sample loop of conftest.py.

Each model mixes fused layers with modules no registration matches. Tolerance (flash-attention's rule, as in
the model sweep): flashdp's float32 result is within twice the error of plain float32 PyTorch (the same
per-sample loop on an unmodified float32 copy) against the float64 loop, plus 8 float32 roundings of the
largest entry (the clipped sum's accumulation order differs from the loop's).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashdp


class GemmaNorm(nn.Module):
    """(1 + w) RMSNorm: no registration matches it (the Llama-style probe refuses it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)
        self.eps = 1e-6

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return h * (1.0 + self.weight)


class Net(nn.Module):
    """A raw parameter read by the root's forward, a custom norm called twice, fused layers around them."""

    def __init__(self, V=7, d=5, k=3):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.norm = GemmaNorm(d)
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, k)

    def forward(self, ids):
        h = self.norm(self.emb(ids)) * self.scale
        h = self.norm(torch.tanh(self.lin(h)))
        return self.head(h)


def _mse(model, ids, y):
    return (model(ids) - y.to(next(model.parameters()).dtype)).pow(2).sum()


def test_raw_parameter_custom_norm_called_twice_match_the_loop(ref):
    torch.manual_seed(0)
    model, B, T = Net(), 5, 3
    ids, y = torch.randint(0, 7, (B, T)), torch.randn(B, T, 3)
    ref.check_against_loop(model, lambda m, b: _mse(m, ids[b:b + 1], y[b:b + 1]), lambda m: _mse(m, ids, y), B)
    assert isinstance(model.lin, flashdp.DPLinear) and isinstance(model.emb, flashdp.DPEmbedding)  # fused stay
    assert isinstance(model.norm, flashdp.fallback.DPFallbackMixin) and isinstance(model, Net)


class Experts(nn.Module):
    """MoE experts as 3-d parameters over flattened tokens (B·T, d), routed by a Linear router's top-k."""

    def __init__(self, E, d, h):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, h, d) * 0.3)
        self.w_out = nn.Parameter(torch.randn(E, d, h) * 0.3)

    def forward(self, x, idx, weights, *, act="tanh"):
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            gate = (weights * (idx == e)).sum(-1, keepdim=True)  # (N, 1): 0 for tokens not routed to e
            hid = getattr(torch, act)(x @ self.w_in[e].t())
            out = out + gate * (hid @ self.w_out[e].t())
        return out


class MoE(nn.Module):
    def __init__(self, d=6, E=3, h=5):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.experts = Experts(E, d, h)
        self.inp = nn.Linear(4, d)

    def forward(self, x):
        hs = self.inp(x)
        B, T, d = hs.shape
        flat = hs.reshape(-1, d)
        w, idx = torch.topk(self.router(flat).softmax(-1), 2, dim=-1)
        return self.experts(flat, idx, w, act="tanh").reshape(B, T, d)


def test_moe_experts_over_flattened_tokens_match_the_loop(ref):
    torch.manual_seed(1)
    model, B, T = MoE(), 4, 5
    x = torch.randn(B, T, 4)
    ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m.inp.weight.dtype)).pow(2).sum(),
                       lambda m: m(x).pow(2).sum(), B)


class Scaled(nn.Module):
    """Uses its weight, which is also a Linear's weight elsewhere (a tied group: dense x factored cross term)."""

    def __init__(self, w):
        super().__init__()
        self.weight = w

    def forward(self, x):
        return torch.tanh(x @ self.weight) * 1.5


class Tied(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        self.scaled = Scaled(self.lin.weight)

    def forward(self, x):
        return self.scaled(self.lin(x)).sum(1)


class TiedHead(nn.Module):
    """An LM head reading a tied embedding table directly, with its own bias (a fallback module)."""

    def __init__(self, emb):
        super().__init__()
        self.emb = [emb]  # not a submodule: the table is reached as a parameter of this module only
        self.weight = emb.weight
        self.bias = nn.Parameter(torch.randn(emb.num_embeddings) * 0.1)

    def forward(self, h):
        return h @ self.weight.t() + self.bias


class TiedEmb(nn.Module):
    def __init__(self, V=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.head = TiedHead(self.emb)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_embedding_tied_with_a_fallback_head_is_one_group(ref):
    torch.manual_seed(8)
    model, B = TiedEmb(), 5
    ids = torch.randint(0, 6, (B, 3))  # repeated ids within a sample
    ref.check_against_loop(model, lambda m, b: m(ids[b:b + 1]).pow(2).sum(), lambda m: m(ids).pow(2).sum(), B)
    assert len(flashdp.privacy_state(model).groups) == 1


def test_parameter_tied_between_fallback_and_linear_is_one_group(ref):
    torch.manual_seed(2)
    model, B = Tied(), 5
    x = torch.randn(B, 3, 4)
    ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m.lin.weight.dtype)).pow(2).sum(),
                       lambda m: m(x).pow(2).sum(), B)
    assert len(flashdp.privacy_state(model).groups) == 1


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot run it, the per-sample loop does."""

    def __init__(self, d=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        idx = (x > 0).nonzero(as_tuple=True)  # a data-dependent shape: vmap refuses it
        return (x * self.w).index_put(idx, (x * self.w * 2)[idx])


def test_forward_vmap_cannot_run_takes_the_per_sample_loop(ref):
    torch.manual_seed(3)
    model, B = nn.Sequential(nn.Linear(3, 3), Branchy()), 4
    x = torch.randn(B, 3)
    ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m[0].weight.dtype)).pow(2).sum(),
                       lambda m: m(x).pow(2).sum(), B)


class HeadWithBias(nn.Module):
    """BERT's LM head: owns ``bias`` and ties it to its decoder's (``decoder.bias = self.bias``)."""

    def __init__(self, d=4, V=6):
        super().__init__()
        self.decoder = nn.Linear(d, V, bias=False)
        self.bias = nn.Parameter(torch.randn(V))
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(x)


def test_bias_owned_by_a_head_and_its_decoder_is_clipped_once(ref):
    torch.manual_seed(4)
    model, B = nn.Sequential(nn.Linear(3, 4), HeadWithBias()), 5
    x = torch.randn(B, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", flashdp.FallbackWarning)  # no fallback: the decoder owns the bias
        ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m[0].weight.dtype)).pow(2).sum(),
                           lambda m: m(x).pow(2).sum(), B)
    assert not isinstance(model[1], flashdp.fallback.DPFallbackMixin)  # the decoder owns the bias
    state = flashdp.privacy_state(model)
    state.check_unchanged()  # the head's own attribute counts as known


def test_warning_names_the_modules_and_fallback_bytes_counts_b_times_numel():
    model = Net()
    with pytest.warns(flashdp.FallbackWarning) as rec:
        flashdp.make_private(model, 1.0)
    msg = str(rec[0].message)
    assert "<root> (Net, 5 parameters)" in msg and "norm (GemmaNorm, 5 parameters)" in msg
    assert "lin" not in msg.split(": ", 2)[-1].replace("linear", "")  # fused layers are not listed
    assert flashdp.fallback_bytes(model, 8) == 8 * (5 + 5) * 4


def test_fallback_false_refuses():
    with pytest.raises(flashdp.UnsupportedModuleError, match="GemmaNorm"):
        flashdp.make_private(Net(), 1.0, fallback=False)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.arange(3.0))

    def forward(self, x):
        return (x + self.shift) * self.w


def test_buffers_are_read_and_left_intact(ref):
    torch.manual_seed(5)
    model, B = WithBuffer(), 3
    x = torch.randn(B, 3)
    ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m.w.dtype)).pow(2).sum(),
                       lambda m: m(x).pow(2).sum(), B)
    assert torch.equal(model.shift, torch.arange(3.0))


class Table(nn.Module):
    """A positional table shared by every sample: its per-sample gradients cannot be separated."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return self.pos[: x.shape[1]][None]


class UsesTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = Table()

    def forward(self, x):
        return x + self.table(x.shape)  # no tensor input at all


def _private(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flashdp.FallbackWarning)
        return flashdp.make_private(model, 1.0)


class SampleMixing(nn.Module):
    """Its output rows mix samples (a batch mean): not per-sample, so the fallback must refuse it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


def test_module_mixing_samples_is_refused_not_silently_wrong():
    model = _private(nn.Sequential(nn.Linear(3, 3), SampleMixing()))
    with pytest.raises(flashdp.FlashDPError, match="does not reproduce its output"):
        model(torch.randn(4, 3)).pow(2).sum().backward()


def test_refusals_name_the_module_and_the_fix():
    model = _private(UsesTable())
    with pytest.raises(flashdp.FlashDPError, match=r"'table'.*none of its inputs has the batch dimension"):
        model(torch.randn(2, 4, 3))

    class Cache:
        pass

    class TakesCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x, cache=None):
            return x * self.w

    model = _private(nn.Sequential(TakesCache()))
    with pytest.raises(flashdp.FlashDPError, match=r"argument of type Cache.*use_cache=False"):
        model[0](torch.randn(2, 3), cache=Cache())

    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(x * self.w)

    model = _private(Dropped())
    with pytest.raises(flashdp.FlashDPError, match="dropout"):
        model(torch.randn(2, 3))
    model.eval()
    model(torch.randn(2, 3)).sum().backward()  # eval mode: no dropout, fine

    model = _private(WithBuffer())
    x = torch.randn(2, 3, requires_grad=True)
    h = x * 1.0
    out = model(h)
    h.add_(1.0)  # an input changed after the forward: the replay would see other values
    with pytest.raises(Exception, match="modified in place"):
        out.sum().backward()


def test_model_without_grad_runs_plain_and_deepcopy_keeps_the_fallback(ref):
    torch.manual_seed(6)
    model = _private(Net())
    ids = torch.randint(0, 7, (2, 3))
    with torch.no_grad():
        a = model(ids)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(ids).detach(), a)
    twin(ids).sum().backward()
    assert all(p.grad is not None for p in twin.parameters())


def test_hf_gemma_like_model_matches_the_loop(ref):
    """Gemma's scaled embedding and (1 + w) RMSNorm through the fallback on a real transformers model."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(7)
    cfg = GemmaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    model = GemmaForCausalLM(cfg).eval()
    B, T = 3, 5
    ids = torch.randint(0, 40, (B, T))

    def loss(m, b):
        return m(input_ids=ids[b:b + 1], labels=ids[b:b + 1]).loss

    ref.check_against_loop(model, loss, lambda m: m(input_ids=ids, labels=ids).loss * B, B)


def test_functional_call_keeps_the_replay_off_the_fused_layers(monkeypatch):
    """During the replay, DP layers inside the fallback module run plain (no second use of their groups)."""
    seen = []
    real = flashdp.layers_common.in_replay

    def spy():
        r = real()
        seen.append(r)
        return r

    monkeypatch.setattr(flashdp.layers_common, "in_replay", spy)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.gelu(self.inner(x)) * self.s

    model = _private(Outer())
    model(torch.randn(2, 3)).sum().backward()
    assert True in seen and False in seen


def test_embedding_subclasses_take_the_fused_path(ref):
    """BART's scaled word embedding and learned positions (offset 2, broadcast over the batch): DPEmbedding under
    their own forward, no fallback, exact."""
    from transformers import BartConfig, BartForCausalLM

    torch.manual_seed(9)
    cfg = BartConfig(vocab_size=40, d_model=16, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=24,
                     max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     scale_embedding=True)
    model = BartForCausalLM(cfg).eval()
    B, T = 3, 5
    ids = torch.randint(3, 40, (B, T))

    def loss(m, b):
        return m(input_ids=ids[b:b + 1], labels=ids[b:b + 1]).loss

    with warnings.catch_warnings():
        warnings.simplefilter("error", flashdp.FallbackWarning)
        ref.check_against_loop(model, loss, lambda m: m(input_ids=ids, labels=ids).loss * B, B)
    dec = model.model.decoder
    assert isinstance(dec.embed_tokens, flashdp.DPEmbedding) and isinstance(dec.embed_positions, flashdp.DPEmbedding)


class Gated(nn.Module):
    """Uses its weight only for samples whose input sum is positive (data-dependent: the per-sample loop runs), and
    returns an empty side output of shape (B, 0, d) (DeepSeek-V4's compressor on short sequences)."""

    def __init__(self, d=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):  # (B, T, d)
        keep = x.sum((1, 2)) > 0
        out = x.clone()
        if bool(keep.any()):
            out = torch.where(keep[:, None, None], x * self.w, x)
        return out, x[:, :0]


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gated = Gated()

    def forward(self, x):
        out, empty = self.gated(self.lin(x))
        return out.pow(2).sum() + empty.sum()


def test_a_sample_whose_replay_does_not_use_the_parameters_gets_zero_and_empty_outputs_pass(ref):
    torch.manual_seed(4)
    model, B = GatedNet(), 4
    x = torch.randn(B, 2, 3)
    with torch.no_grad():
        signs = model.lin(x).sum((1, 2)) > 0
    assert 0 < int(signs.sum()) < B, "the test needs samples on both branches"
    ref.check_against_loop(model, lambda m, b: m(x[b:b + 1].to(m.lin.weight.dtype)), lambda m: m(x), B)
