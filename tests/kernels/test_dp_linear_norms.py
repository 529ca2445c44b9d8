"""dp_linear_norms: Triton (interpreter on CPU) and torch paths against a float64 per-sample reference."""

import pytest
import torch

from memtrain.kernels import dp_linear_norms as K

SHAPES = [(3, 5, 37, 19), (2, 17, 7, 33), (1, 1, 3, 2), (4, 33, 16, 16)]


def _reference(G, X, with_bias):
    p = torch.einsum("bto,bti->boi", G.double(), X.double())
    sq = p.pow(2).sum((1, 2))
    if with_bias:
        sq += G.double().sum(1).pow(2).sum(1)
    return sq


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["direct", "ghost"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_path(shape, method, with_bias):
    B, T, d_in, d_out = shape
    G, X = torch.randn(B, T, d_out), torch.randn(B, T, d_in)
    got = K._dp_linear_norms_torch(G, X, with_bias, method)
    torch.testing.assert_close(got.double(), _reference(G, X, with_bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_triton_path(shape, method):
    pytest.importorskip("triton")
    B, T, d_in, d_out = shape
    G, X = torch.randn(B, T, d_out), torch.randn(B, T, d_in)
    got = K._dp_linear_norms_triton(G, X, True, method)
    torch.testing.assert_close(got.double(), _reference(G, X, True), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, K._dp_linear_norms_torch(G, X, True, method), rtol=1e-5, atol=1e-4)


def test_non_contiguous_and_bf16():
    G = torch.randn(3, 7, 11).transpose(0, 1).contiguous().transpose(0, 1)  # strided
    X = torch.randn(3, 7, 5)
    ref = _reference(G, X, False)
    torch.testing.assert_close(K.dp_linear_norms(G, X, method="ghost").double(), ref, rtol=1e-5, atol=1e-4)
    Gb, Xb = G.bfloat16(), X.bfloat16()
    ref_b = _reference(Gb.float(), Xb.float(), False)
    err = (K.dp_linear_norms(Gb, Xb, method="direct").double() - ref_b).abs().max()
    assert err <= 1e-4 * ref_b.abs().max()  # computed in fp32 from bf16 inputs


def test_ghost_rule_and_bad_input():
    assert K.ghost_is_cheaper(128, 512, 512) and not K.ghost_is_cheaper(1024, 64, 64)
    with pytest.raises(ValueError, match="same B and T"):
        K.dp_linear_norms(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="unknown method"):
        K._dp_linear_norms_torch(torch.randn(2, 3, 4), torch.randn(2, 3, 4), False, "magic")
