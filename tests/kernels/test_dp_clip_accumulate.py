"""dp_clip_accumulate_ (row-scaled GEMM): torch/cuBLAS and Triton (interpreter on CPU, compiled on a GPU)
against a float64 reference; clip factors against the formula; CUDA precision against float64."""

import pytest
import torch

from memtrain.kernels import dp_clip_accumulate as A

SHAPES = [(3, 5, 37, 19), (2, 17, 7, 33), (1, 1, 3, 2)]


def _ref(G, X, coef, layout):
    w = torch.einsum("b,bto,bti->oi", coef.double(), G.double(), X.double())
    return (w if layout == "out_in" else w.t()), torch.einsum("b,bto->o", coef.double(), G.double())


def _run(impl, G, X, coef, gw, gb, layout, device="cpu", **kw):
    """Run one implementation on copies on ``device``; write the results back into the CPU gw and gb."""
    fn = A._dp_clip_accumulate_triton if impl == "triton" else A._dp_clip_accumulate_torch
    d = [t.to(device) if t is not None else None for t in (G, X, coef, gw, gb)]
    fn(*d, layout, **kw)
    for host, dev in ((gw, d[3]), (gb, d[4])):
        if host is not None:
            host.copy_(dev.cpu())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_clip_accumulate(shape, layout, impl, triton_device):
    if impl == "triton":
        pytest.importorskip("triton")
    B, T, d_in, d_out = shape
    G, X, coef = torch.randn(B, T, d_out), torch.randn(B, T, d_in), torch.rand(B)
    G_copy = G.clone()
    w0 = torch.randn(d_out, d_in) if layout == "out_in" else torch.randn(d_in, d_out)
    gw, gb = w0.clone(), torch.zeros(d_out)
    _run(impl, G, X, coef, gw, gb, layout, triton_device if impl == "triton" else "cpu")
    rw, rb = _ref(G, X, coef, layout)
    torch.testing.assert_close(gw.double(), w0.double() + rw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)
    assert torch.equal(G, G_copy)  # grad_output is never modified


@pytest.mark.parametrize("config", [{"BLOCK_O": o, "BLOCK_I": i, "BLOCK_R": r} for o, i, r, _, _ in
                                    [*A._TILES_FP32[:2], A._TILES_16BIT[0]]], ids=lambda c: "x".join(
                                        map(str, c.values())))
@pytest.mark.parametrize("overwrite", [False, True])
def test_triton_tiles(config, overwrite, triton_device):
    """Several tiles of each autotuned size per dimension, ragged edges, rows of several samples per K step."""
    pytest.importorskip("triton")
    B, T, d_in, d_out = 3, 50, 131, 70
    G, X, coef = torch.randn(B, T, d_out), torch.randn(B, T, d_in), torch.rand(B)
    w0 = torch.randn(d_out, d_in)
    gw = w0.clone()
    _run("triton", G, X, coef, gw, None, "out_in", triton_device, overwrite=overwrite, config=config)
    rw, _ = _ref(G, X, coef, "out_in")
    torch.testing.assert_close(gw.double(), rw + (0 if overwrite else w0.double()), rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_inputs_fp32_gradient(impl, triton_device):
    """Autocast's case: bf16 G and X, fp32 gradient. Both round c·G (or c·X) to bf16 once (2^-8 relative per
    element; the interpreter's cast truncates: 2^-7), then sum exact products in fp32."""
    if impl == "triton":
        pytest.importorskip("triton")
    B, T, d_in, d_out = 3, 20, 33, 17
    G, X, coef = torch.randn(B, T, d_out).bfloat16(), torch.randn(B, T, d_in).bfloat16(), torch.rand(B)
    gw = torch.zeros(d_out, d_in)
    _run(impl, G, X, coef, gw, None, "out_in", triton_device if impl == "triton" else "cpu")
    rw, _ = _ref(G, X, coef, "out_in")
    bound = 2.0**-7 * torch.einsum("b,bto,bti->oi", coef.double(), G.double().abs(), X.double().abs())
    assert ((gw.double() - rw).abs() <= bound + 1e-6).all()


def test_overwrite_ignores_previous_contents():
    B, T, d_in, d_out = 2, 3, 5, 4
    G, X, coef = torch.randn(B, T, d_out), torch.randn(B, T, d_in), torch.rand(B)
    gw = torch.full((d_out, d_in), float("nan"))
    A._dp_clip_accumulate_torch(G, X, coef, gw, None, "out_in", overwrite=True)
    torch.testing.assert_close(gw.double(), _ref(G, X, coef, "out_in")[0], rtol=1e-5, atol=1e-5)


def test_clip_factors_against_the_formula():
    """coef_b = scale · min(1, C / (scale·‖g_b‖ + 1e-6)) for raw squared norms ‖g_b‖², written out here."""
    sq = torch.tensor([0.0, 1e-12, 0.25, 1.0, 100.0, 1e6], dtype=torch.float64)
    for max_norm, scale in ((2.0, 1.0), (0.5, 4.0), (1e-3, 32.0)):
        got = A.clip_factors(sq.float(), max_norm, scale).double()
        norms = sq.sqrt() * scale
        want = torch.tensor([scale * min(1.0, max_norm / (n + 1e-6)) for n in norms.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert (got > 0).all()
        assert (got * sq.sqrt() <= max_norm * (1 + 1e-6)).all()  # every clipped sample gradient has norm <= C


# ------------------------------------------------------------------------------------------ CUDA precision
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("impl", ["cublas", "triton"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_cuda_precision_against_float64(impl, dtype, grad_dtype, layout, fp32_matmul_exact):
    """Error <= 2 x the error of plain torch in the same dtype (mm of (c⊙G)ᵀ and X, result in the gradient's
    dtype) + a small atol; a TF32 dot in the fp32 case misses it by two orders of magnitude."""
    B, T, d_in, d_out = 4, 300, 384, 520
    G = torch.randn(B, T, d_out, device="cuda").to(dtype)
    X = torch.randn(B, T, d_in, device="cuda").to(dtype)
    coef = torch.rand(B, device="cuda")
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    gw = torch.zeros(shape, device="cuda", dtype=grad_dtype)
    fn = A._dp_clip_accumulate_triton if impl == "triton" else A._dp_clip_accumulate_torch
    fn(G, X, coef, gw, None, layout)
    ref = _ref(G, X, coef, layout)[0]
    cg = (G * coef.to(dtype).view(B, 1, 1)).reshape(B * T, d_out)
    plain = (cg.t() @ X.reshape(B * T, d_in)).to(grad_dtype)
    plain = plain if layout == "out_in" else plain.t()
    err = (gw.double() - ref).abs().max().item()
    err_torch = (plain.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * ref.abs().max().item(), (err, err_torch)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_beyond_2_31_elements():
    """An LM head's G with B·T·V > 2^31 elements (int32 row offsets wrapped before): the rows of the last
    samples reach the gradient."""
    B, T, d_in, d_out = 66, 262, 256, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(B, T, d_out, device="cuda", dtype=torch.bfloat16, generator=g)
    X = torch.randn(B, T, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
    coef = torch.zeros(B, device="cuda")
    coef[-1] = 1.0  # only the last sample, whose rows sit past 2^31 elements
    for impl in ("cublas", "triton"):
        gw = torch.zeros(d_out, d_in, device="cuda")
        fn = A._dp_clip_accumulate_triton if impl == "triton" else A._dp_clip_accumulate_torch
        fn(G, X, coef, gw, None, "out_in")
        ref = G[-1].double().t() @ X[-1].double()
        # bf16 inputs, fp32 accumulation over T = 262 rows (T·2⁻²⁴ relative to Σ|products|, below 1e-3 of the
        # largest entry), and 2⁻⁸ per entry where torch offers no fp32 GEMM output. A wrapped row offset reads
        # other rows: errors of order 1.
        bound = 2.0**-8 * ref.abs() + 1e-3 * ref.abs().max()
        assert ((gw.double() - ref).abs() <= bound).all(), impl
