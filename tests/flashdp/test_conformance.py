"""Conformance checks a DP library is held to, against references independent of flashdp's code.

- σ = 0 and thresholds nothing reaches: every gradient equals the plain autograd gradient of an unmodified
  float64 copy, to float64 rounding (not fp32's), on every clipping path, biases and norm weights included;
- a sequence-first (T, B, d) input is refused, never clipped across samples by a layout guessed from a row
  count; a model/input device mix names both devices;
- micro-batches accumulate to one batch, divided by the expected (not the realised) batch size;
- torch.compile of a private model clips as the per-sample loop does.

Per-layer clipping, tied groups, bf16 and the accountant's published values are checked in test_models.py,
test_layers_*.py and test_accounting.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flashdp
from flashdp import dispatch
from flashdp.errors import FlashDPError

U64 = 2.0**-53  # float64 unit roundoff


class _AllLayers(nn.Module):
    """An embedding tied to the head, LayerNorm, torch RMSNorm, Linears with and without bias; odd sizes."""

    def __init__(self, V=23, d=13, h=17):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.rms = nn.RMSNorm(h)
        self.down = nn.Linear(h, d)  # d_out < d_in and the reverse in `up`: both bias-sum branches
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.ln(self.emb(ids))
        return self.head(x + self.down(torch.tanh(self.rms(self.up(x)))))


def _loss(model, ids):
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, 1).flatten())


@pytest.mark.parametrize("path", [None, "ghost", "direct", "once"])
def test_float64_unreached_thresholds_give_plain_gradients_to_float64_rounding(path):
    torch.manual_seed(0)
    B, T = 5, 7
    model = _AllLayers().double()
    ids = torch.randint(0, 23, (B, T))
    plain = copy.deepcopy(model)  # unmodified: the reference is torch's own autograd
    _loss(plain, ids).backward()
    flashdp.make_private(model, 1e12)  # no sample's group norm comes near C/√L: every clip factor is 1
    with dispatch.force_path(path):
        _loss(model, ids).backward()
    want = {n: p.grad * B for n, p in plain.named_parameters()}  # a sample's gradient: its contribution × B
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float64, n
        # Both are float64 sums of the same B·T·d products in different orders: each sum's rounding is at most
        # (number of terms)·u relative to the sum of the terms' magnitudes; fp32 accumulation (the defect this
        # guards against) would leave ~2^-24 ≈ 6e-8 relative.
        terms = B * T * 23
        scale = want[n].abs().max().item()
        err = (p.grad - want[n]).abs().max().item()
        assert err <= terms * U64 * 8 * scale, (n, err / scale)


def test_float64_once_path_under_a_reached_threshold_matches_per_sample_loop(ref):
    """The "once" path on float64 tensors (it called fp32 norms on them) clips like the per-sample loop."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: m(x[b:b + 1]).sum() * 3, 3, 0.5,
                                            dtype=torch.float64)
    flashdp.make_private(model, 0.5, loss_reduction="sum")
    with dispatch.force_path("once"):
        (model(x).sum() * 3).backward()
    for n, p in model.named_parameters():
        # clipped: the factor comes from a float64 norm; 30 products summed per entry, float64 rounding
        torch.testing.assert_close(p.grad, want[n], rtol=64 * U64 * 30, atol=0)


class _SeqFirst(nn.Module):
    """Takes a batch-first (B, T, d) batch and runs its Linear sequence-first, as a (T, B, d) tensor."""

    def __init__(self, how: str):
        super().__init__()
        self.fc, self.how = nn.Linear(4, 3), how

    def forward(self, x):
        h = x.transpose(0, 1)
        if self.how == "view":  # flattened time-major: row count T·B, a multiple of B
            h = h.contiguous().view(-1, 4)
        return self.fc(h)


@pytest.mark.parametrize("how", ["3d", "view"])
def test_sequence_first_input_is_refused_whatever_its_row_count(how):
    """T = 6 is a multiple of B = 3: the rows would pass a row-count check, and be clipped across samples."""
    model = flashdp.make_private(_SeqFirst(how), 1.0)
    with pytest.raises(FlashDPError, match=r"fc got .*\(6, 3, 4\).*batch has 3 samples.*Sequence-first"):
        model(torch.randn(3, 6, 4)).sum().backward()


def test_batch_flattened_sample_major_is_still_accepted(ref):
    """x.reshape(-1, d) of a batch-first tensor (OPT's decoder layers): B samples of T rows each."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.reshape(-1, 4))

    torch.manual_seed(0)
    model = Flat()
    x = torch.randn(3, 6, 4)
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: m(x[b:b + 1].double()).sum() * 3, 3, 0.3)
    flashdp.make_private(model, 0.3)
    model(x).sum().backward()
    ref.assert_grads_close(model, want, rtol=1e-5, atol=1e-6)  # fp32 sums of 18 rows: ~18·2^-24 relative


def test_model_and_input_on_different_devices_names_both():
    model = flashdp.make_private(nn.Linear(4, 3), 1.0)
    with pytest.raises(FlashDPError, match=r"input is on meta and its parameters on cpu.*move the input"):
        model(torch.randn(2, 4, device="meta"))


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))


def _mean_loss(m, x):
    return m(x).pow(2).sum(1).mean()


def test_accumulated_micro_batches_equal_one_batch_divided_by_the_expected_size(ref):
    """Micro-batches of 2 and 5 samples (each its own mean loss), one step: the update is −lr·Σ_b clip(g_b)/E
    over all 7 samples with E = 9 the expected batch size, not the realised 7 (Poisson sampling)."""
    model = _small()
    x = torch.randn(7, 4) * 3
    want, norms, _ = ref.per_sample_clipped_sum(model, lambda m, b: _mean_loss(m, x[b:b + 1].double()), 7, 1.0)
    assert any(n > 1 / 3**0.5 for row in norms for n in row)  # some samples are clipped (C_l = 1/√3)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                              expected_batch_size=9)
    _mean_loss(model, x[:2]).backward()
    _mean_loss(model, x[2:]).backward()
    opt.step()
    for n, p in model.named_parameters():
        # fp32 against float64: the clipped sums of 7 samples, a few fp32 roundings each (≈ 7·4·2^-24 relative)
        torch.testing.assert_close(p.detach().double(), before[n] - 0.5 * want[n] / 9, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_per_sample_loop(ref, backend):
    """torch.compile of a private model: the DP autograd Functions run inside the compiled graph's backward
    (aot_eager traces them; inductor also generates code, minutes on a loaded CPU, so it is marked slow)."""
    model = _small()
    x = torch.randn(5, 4) * 3
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _mean_loss(m, x[b:b + 1].double()), 5, 1.0)
    flashdp.make_private(model, 1.0)
    compiled = torch.compile(model, backend=backend)
    _mean_loss(compiled, x).backward()
    ref.assert_grads_close(model, want, rtol=1e-5, atol=1e-6)  # fp32 sums of 5 clipped samples
