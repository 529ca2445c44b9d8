"""DPLinear / GPT-2 Conv1D against the float64 per-sample loop: input ranks, odd shapes, every path."""

import copy

import pytest
import torch
from torch import nn

import flashdp
from flashdp.dispatch import force_path


class Net(nn.Module):
    def __init__(self, d_in, d_hidden, d_out, bias=True):
        super().__init__()
        self.a = nn.Linear(d_in, d_hidden, bias=bias)
        self.b = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _loss(model, x):
    return model(x).pow(2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("path", ["once", "ghost", "direct"])
@pytest.mark.parametrize("shape", [(5,), (5, 7), (3, 4, 5)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_per_sample_loop(ref, path, shape, bias):
    B, d_in = 6, 11
    model = Net(d_in, 13, 3, bias=bias)
    x = torch.randn(B, *shape[:-1], d_in) if len(shape) > 1 else torch.randn(B, d_in)
    x = x * torch.linspace(0.2, 3, B).view(B, *([1] * (x.dim() - 1)))  # some samples clipped, some not
    _, norms, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 1e9)
    C = sorted(n for row in norms for n in row)[len(norms)] * 2**0.5  # C_l = a middle per-sample norm
    want, norms, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, C)
    flashdp.make_private(model, C)
    with force_path(path):
        _loss(model, x).backward()
    ref.assert_grads_close(model, want)
    flat = [n for row in norms for n in row]
    assert min(flat) < C / 2**0.5 < max(flat), "test should mix clipped and unclipped samples"


def test_sum_reduction_and_accumulation(ref):
    B = 5
    model = Net(7, 9, 2)
    x = torch.randn(B, 4, 7)
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: m(x[b:b + 1].double()).sum(), B, 1.0)
    flashdp.make_private(model, 1.0, loss_reduction="sum")
    model(x[:2]).sum().backward()  # two backward passes accumulate (gradient accumulation)
    model(x[2:]).sum().backward()
    ref.assert_grads_close(model, want)


def test_frozen_weight_trainable_bias(ref):
    B = 4
    model = Net(6, 5, 3)
    model.a.weight.requires_grad_(False)
    x = torch.randn(B, 3, 6)
    want, _, groups = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 1.0)
    assert ["a.bias"] in groups
    flashdp.make_private(model, 1.0)
    _loss(model, x).backward()
    ref.assert_grads_close(model, want)
    assert model.a.weight.grad is None


def test_conv1d_matches(ref):
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(9, 7)  # nf=9 outputs, nx=7 inputs; weight (7, 9)

        def forward(self, x):
            return self.c(x)

    B = 5
    model = M()
    x = torch.randn(B, 3, 7) * 2
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 1.0)
    flashdp.make_private(model, 1.0)
    assert isinstance(model.c, Conv1D) and type(model.c).__name__ == "DPConv1D"
    for path in ["once", "ghost"]:
        model.zero_grad()
        with force_path(path):
            _loss(model, x).backward()
        ref.assert_grads_close(model, want)


def test_module_called_twice_is_one_group(ref):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(6, 6)

        def forward(self, x):
            return self.f(torch.tanh(self.f(x)))

    B = 4
    model = Twice()
    x = torch.randn(B, 3, 6) * 2
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: _loss(m, x[b:b + 1].double()), B, 0.5)
    flashdp.make_private(model, 0.5)
    _loss(model, x).backward()
    ref.assert_grads_close(model, want)


def test_empty_batch_gives_zero_grads():
    model = Net(4, 5, 2)
    flashdp.make_private(model, 1.0)
    x = torch.randn(0, 3, 4, requires_grad=True)
    model(x).sum().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_grad_input_unchanged_and_grad_output_not_modified():
    torch.manual_seed(1)
    model = Net(5, 7, 3)
    plain = copy.deepcopy(model)
    x1 = torch.randn(4, 3, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    flashdp.make_private(model, 1.0)
    g = torch.randn(4, 3, 3)
    g_copy = g.clone()
    model(x1).backward(g)
    plain(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert torch.equal(g, g_copy)
