"""dp_clip_accumulate_ (row-scaled GEMM) and dp_clip_once_: Triton interpreter / torch vs float64 reference."""

import pytest
import torch

from memtrain.kernels import dp_clip_accumulate as A
from memtrain.kernels import dp_clip_once as O

SHAPES = [(3, 5, 37, 19), (2, 17, 7, 33), (1, 1, 3, 2)]


def _ref(G, X, coef, layout):
    w = torch.einsum("b,bto,bti->oi", coef.double(), G.double(), X.double())
    return (w if layout == "out_in" else w.t()), torch.einsum("b,bto->o", coef.double(), G.double())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_clip_accumulate(shape, layout, impl):
    if impl == "triton":
        pytest.importorskip("triton")
    B, T, d_in, d_out = shape
    G, X, coef = torch.randn(B, T, d_out), torch.randn(B, T, d_in), torch.rand(B)
    G_copy = G.clone()
    w0 = torch.randn(d_out, d_in) if layout == "out_in" else torch.randn(d_in, d_out)
    gw, gb = w0.clone(), torch.zeros(d_out)
    fn = A._dp_clip_accumulate_triton if impl == "triton" else A._dp_clip_accumulate_torch
    fn(G, X, coef, gw, gb, layout)
    rw, rb = _ref(G, X, coef, layout)
    torch.testing.assert_close(gw.double(), w0.double() + rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)
    assert torch.equal(G, G_copy)  # grad_output is never modified


def test_clip_factors():
    sq = torch.tensor([0.0, 1.0, 100.0])
    c = A.clip_factors(sq, max_norm=2.0, scale=1.0)
    torch.testing.assert_close(c, torch.tensor([1.0, 1.0, 2.0 / (10 + 1e-6)]))
    c2 = A.clip_factors(sq, max_norm=2.0, scale=4.0)  # sample grads are 4× the raw ones
    assert (c2 * sq.sqrt() <= 2.0 + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_clip_once_matches_two_pass(shape, layout):
    B, T, d_in, d_out = shape
    G, X = torch.randn(B, T, d_out), torch.randn(B, T, d_in)
    shape_w = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    gw1, gb1 = torch.zeros(shape_w), torch.zeros(d_out)
    sq1 = O.dp_clip_once_(G, X, gw1, gb1, 0.7, 2.0, layout=layout)
    sq2 = torch.einsum("bto,bti->boi", G.double(), X.double()).pow(2).sum((1, 2)) + G.double().sum(1).pow(2).sum(1)
    torch.testing.assert_close(sq1.double(), sq2, rtol=1e-5, atol=1e-5)
    coef = A.clip_factors(sq2.float(), 0.7, 2.0)
    rw, rb = _ref(G, X, coef, layout)
    torch.testing.assert_close(gw1.double(), rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1.double(), rb, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_cooperative_kernel():
    B, T, d_in, d_out = 3, 37, 45, 29
    G, X = torch.randn(B, T, d_out, device="cuda"), torch.randn(B, T, d_in, device="cuda")
    gw = torch.zeros(d_out, d_in, device="cuda")
    sq = O._dp_clip_once_cuda(G, X, gw, None, 0.5, 3.0)
    gw2 = torch.zeros(d_out, d_in)
    sq2 = O._dp_clip_once_torch(G.cpu(), X.cpu(), gw2, None, 0.5, 3.0)
    torch.testing.assert_close(sq.cpu(), sq2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.cpu(), gw2, rtol=1e-4, atol=1e-5)
