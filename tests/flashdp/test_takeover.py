"""A module that reads a child's parameters directly: the generic fallback takes the child over (flashdp.takeover).

Checked against the independent per-sample loop of conftest.py (groups from the module structure, one backward
per sample in float64). Tolerance as in test_fallback.py (flash-attention's rule): flashdp's float32 result is
within twice the error of plain float32 PyTorch (the same loop on an unmodified float32 copy) against the float64
loop, plus 8 float32 roundings of the largest entry (the clipped sum's accumulation order differs from the loop's).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashdp


def causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A depthwise causal convolution that reads ``conv``'s parameters (Qwen3-Next's and LFM's helpers)."""
    k = conv.weight.shape[-1]
    return F.conv1d(F.pad(x, (k - 1, 0)), conv.weight, conv.bias, groups=x.shape[1])


class Mixer(nn.Module):
    """A Mamba-like mixer: its own ``A``, a conv handed to a function, ``dt.bias`` and ``out.weight`` read directly,
    ``dt`` also called normally."""

    def __init__(self, d=4):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d))
        self.inp = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, groups=d)
        self.dt = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):  # (B, T, d)
        h = causal_conv(self.inp(x).transpose(1, 2), self.conv).transpose(1, 2)
        g = F.softplus(self.dt(h) + self.dt.bias) * self.A
        return F.linear(torch.tanh(h * g), self.out.weight, self.out.bias)


class MixerNet(nn.Module):
    def __init__(self, V=9, d=4, k=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = Mixer(d)
        self.head = nn.Linear(d, k)

    def forward(self, ids):
        return self.head(self.mix(self.emb(ids)))


def _ce(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), (ids % logits.shape[-1]).reshape(-1),
                           reduction="sum")


def test_parent_reading_children_directly_matches_the_loop_with_the_childrens_groups(ref):
    torch.manual_seed(0)
    model = MixerNet()
    ids = torch.randint(0, 9, (5, 7))
    C, groups = ref.check_against_loop(model, lambda m, b: _ce(m, ids[b:b + 1]), lambda m: _ce(m, ids), 5)
    state = flashdp.privacy_state(model)
    # the groups are make_private's usual ones (each child's weight and bias together, the mixer's own A alone),
    # whoever replays the computation: the taken-over children keep theirs
    assert sorted(sorted(g.param_names) for g in state.groups) == sorted(groups)
    assert all(g.max_norm == pytest.approx(C / math.sqrt(len(groups))) for g in state.groups)
    assert model.mix.__dict__["_flashdp_taken"] == ["conv.weight", "conv.bias", "dt.weight", "dt.bias",
                                                    "out.weight", "out.bias"]
    # B x numel fp32 per-sample gradients of every parameter a replay differentiates, once each (the conv is a
    # fallback module of its own too)
    mix = model.mix
    taken = sum(p.numel() for m in (mix.conv, mix.dt, mix.out) for p in m.parameters())
    assert flashdp.fallback_bytes(model, 5) == 5 * 4 * (mix.A.numel() + taken)


def test_noise_std_is_sigma_times_c_total_over_the_released_groups():
    """The groups are unchanged by the take-over, so the noise std is σ·√(Σ_l C_l²) = σ·C with the default
    C_l = C/√L; measured on the released coordinates after one step with all gradients zero."""
    torch.manual_seed(0)
    model = MixerNet(V=50, d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flashdp.FallbackWarning)
        flashdp.make_private(model, 2.0)
    sigma = 1.5
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                              max_grad_norm=2.0, expected_batch_size=1)
    assert opt.noise_std == pytest.approx(sigma * 2.0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    noise = torch.cat([(b - p.detach()).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    n = noise.numel()
    # the sample std of n Gaussian draws is within 6 of its standard errors σ_s/√(2n) of σ_s (a false alarm ~1e-9)
    assert abs(float(noise.std()) - sigma * 2.0) <= 6 * sigma * 2.0 / math.sqrt(2 * n)


class Attention(nn.Module):
    """Returns its own bias for the caller to add (GPT-NeoX-Japanese's attention)."""

    def __init__(self, d=4):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.dense_bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(self.proj(x)), self.dense_bias


class Layer(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.attention = Attention(d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        h, bias = self.attention(x)
        return self.mlp(h + bias.expand_as(x)) * (1 + bias)


class LayerNet(nn.Module):
    def __init__(self, V=9, d=4, k=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.layer = Layer(d)
        self.head = nn.Linear(d, k)

    def forward(self, ids):
        return self.head(self.layer(self.emb(ids)))


def test_parameter_returned_by_a_child_is_taken_over_by_its_caller(ref):
    torch.manual_seed(1)
    model = LayerNet()
    ids = torch.randint(0, 9, (4, 6))
    ref.check_against_loop(model, lambda m, b: _ce(m, ids[b:b + 1]), lambda m: _ce(m, ids), 4)
    assert model.layer.__dict__["_flashdp_taken"] == ["attention.dense_bias"]


class Hidden(nn.Module):
    """Reads its child's weight through getattr: the source scan cannot see it."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x @ getattr(self, "li" + "n").weight.t()


def test_a_direct_read_the_scan_misses_is_refused_in_backward_not_silent():
    model = nn.Sequential(nn.Embedding(9, 4), Hidden(), nn.Linear(4, 3))
    flashdp.make_private(model, 1.0)
    with pytest.raises(flashdp.FlashDPError, match=r"1\.lin\.weight.*outside a DP layer"):
        model(torch.randint(0, 9, (3, 5))).sum().backward()


class SinePositions(nn.Embedding):
    """A learned positional table looked up with one (T,) row for the whole batch (Blenderbot's)."""

    def forward(self, shape):
        positions = torch.arange(shape[1], device=self.weight.device)
        return super().forward(positions)


class PositionsNet(nn.Module):
    def __init__(self, V=9, d=4, k=5, T=8):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.embed_positions = type("LearnedPositionalEmbedding", (SinePositions,), {})(T, d)
        self.head = nn.Linear(d, k)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids) + self.embed_positions(ids.shape)))


@pytest.mark.parametrize("B,T", [(3, 6), (5, 5)])  # T == B: positions must not pass for one row per sample
def test_positions_shared_by_the_batch_are_clipped_per_sample(ref, B, T):
    torch.manual_seed(2)
    model = PositionsNet(T=T)
    ids = torch.randint(0, 9, (B, T))
    ref.check_against_loop(model, lambda m, b: _ce(m, ids[b:b + 1]), lambda m: _ce(m, ids), B)


def test_mamba_matches_the_loop(ref):
    """A real tiny transformers Mamba (its mixer reads conv1d, x_proj, dt_proj and out_proj directly)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=20, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3,
                      time_step_rank=2, use_cache=False)
    model = MambaForCausalLM(cfg).eval()
    ids = torch.randint(0, 20, (3, 5))

    def loss(m, x):
        return m(input_ids=x, labels=x, use_cache=False).loss

    # the model's loss is a mean over the batch's tokens, the mean of the samples' own losses (equal lengths)
    ref.check_against_loop(model, lambda m, b: loss(m, ids[b:b + 1]), lambda m: loss(m, ids), 3, reduction="mean")
    assert "conv1d.weight" in model.backbone.layers[0].mixer.__dict__["_flashdp_taken"]


class ExpertMajor(nn.Module):
    """Its experts see the tokens repeated expert-major, (E·B·T, d) (Llama 4's MoE): only a replay of the parent
    separates the samples."""

    def __init__(self, d=4, E=2):
        super().__init__()
        self.E = E
        self.experts = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, x):  # (B, T, d)
        rows = x.reshape(-1, x.shape[-1])
        scale = torch.arange(1, self.E + 1).repeat_interleave(rows.shape[0])[:, None]
        out = self.experts(rows.repeat(self.E, 1) * scale)
        return out.reshape(self.E, *x.shape).sum(0)


def test_known_parent_replays_children_that_see_another_layout(ref, monkeypatch):
    from flashdp import takeover

    monkeypatch.setitem(takeover.KNOWN, f"{ExpertMajor.__module__}.{ExpertMajor.__qualname__}", ("experts",))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(9, 4), ExpertMajor(), nn.Linear(4, 5))
    ids = torch.randint(0, 9, (3, 4))

    def loss(m, x):
        logits = m(x)
        return F.cross_entropy(logits.reshape(-1, 5), (x % 5).reshape(-1), reduction="sum")

    ref.check_against_loop(model, lambda m, b: loss(m, ids[b:b + 1]), lambda m: loss(m, ids), 3)
    assert model[1].__dict__["_flashdp_taken"] == ["experts.0.weight", "experts.0.bias", "experts.2.weight",
                                                   "experts.2.bias"]


def test_deepcopy_keeps_the_take_over():
    import copy

    torch.manual_seed(5)
    model = MixerNet()
    ids = torch.randint(0, 9, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flashdp.FallbackWarning)
        flashdp.make_private(model, 0.5)
    twins = [copy.deepcopy(model)]
    _ce(model, ids).backward()
    for twin in twins:
        assert twin.mix.__dict__["_flashdp_taken"] == model.mix.__dict__["_flashdp_taken"]
        _ce(twin, ids).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), n  # the same computation on the same values: bit for bit
