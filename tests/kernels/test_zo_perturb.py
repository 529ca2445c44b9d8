"""The fused update p <- p + Σ_j a_j z(seed_j) + c p: every backend against a float64 reference built from
the NumPy noise, odd shapes, dtypes, layouts, no tensor-sized temporaries, errors."""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import memtrain._cpp
from memtrain._cpp import cpp_available
from memtrain.kernels import zo_perturb as Z
from memtrain.kernels.philox import HAS_TRITON
from memtrain.testing import assert_close_verbose, philox_noise_numpy

BACKENDS = ["cpp", "torch", "triton"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TERMS = {
    "decay-only": ([], [], -0.05),
    "perturb": ([11], [1e-3], 0.0),
    "flip": ([11], [-2e-3], 0.0),
    "update+perturb": ([11, 2**63 + 5], [0.3, -0.7], -0.01),
    "three": ([1, 2, 3], [0.5, -0.25, 0.125], 0.0),
    # past the Triton kernel's scalar slots (SCALAR_TERMS = 4): terms 5 and 6 come from a device tensor
    "six": ([1, 2**64 - 1, 3, 2**31, 5, 2**32 + 7], [0.5, -0.25, 0.125, 0.3, -1e-3, 2.0], 0.02),
}


def run(backend, p, seeds, coefs, stream, c, dist="normal", offset=0, triton_device="cpu"):
    """Run one backend on ``p`` (CPU) in place; the Triton launcher gets a copy on ``triton_device``."""
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build; see the install log")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    target = p.to(triton_device) if backend == "triton" else p
    getattr(Z, f"_zo_perturb_{backend}")(target, seeds, coefs, stream, c, 0 if dist == "normal" else 1, offset)
    if target is not p:
        p.copy_(target.cpu())
    return p


def reference(p0, seeds, coefs, stream, c, dist="normal", offset=0):
    """float64: p + Σ a_j z_j + c p, with z from the independent NumPy Philox."""
    flat = p0.double().flatten().numpy()
    acc = sum((a * philox_noise_numpy(s, stream, flat.size, offset, dist) for s, a in zip(seeds, coefs, strict=True)),
              np.zeros_like(flat))
    return torch.from_numpy(flat + acc + c * flat).view(p0.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("shape,offset", [((1,), 0), ((7, 3), 1), ((1031,), 6), ((5, 211), 2**33 + 3)])
def test_matches_float64_reference(backend, dtype, terms, shape, offset, triton_device):
    seeds, coefs, c = terms
    p0 = torch.randn(shape).to(dtype)
    out = run(backend, p0.clone(), seeds, coefs, 9, c, offset=offset, triton_device=triton_device)
    ref = reference(p0, seeds, coefs, 9, c, offset=offset)
    # flash-attn's rule: error <= 2x that of rounding the exact result to the dtype, plus fp32 noise error
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    assert_close_verbose(out, ref, atol=2 * rounding + 4e-6, rtol=0, name=f"{backend}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", ["update+perturb", "six"])
def test_backends_agree_bitwise(dtype, terms, triton_device):
    """cpp, torch and Triton do the same operations with the same roundings and no FMA contraction (see
    memtrain.kernels.philox), so their results are the same bits in every dtype. The Triton interpreter is held
    to it here; a compiled GPU kernel to one ulp by test_cuda_matches_cpu."""
    seeds, coefs, c = TERMS[terms]
    p0 = torch.randn(4099).to(dtype)
    backends = ["cpp", "torch"] + (["triton"] if triton_device == "cpu" and HAS_TRITON else [])
    outs = {b: run(b, p0.clone(), seeds, coefs, 9, c, offset=5) for b in backends}
    for name, out in outs.items():
        assert torch.equal(out, outs["cpp"]), f"{name} differs from cpp in {(out != outs['cpp']).sum()} elements"


def test_triton_scalar_terms_need_no_host_tensor(monkeypatch, triton_device):
    """Up to SCALAR_TERMS terms travel as kernel arguments: no host tensor, no host-to-device copy per call."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")

    def refuse(*args, **kwargs):
        raise AssertionError("a term tensor was built for a call the scalar slots cover")

    monkeypatch.setattr(Z, "_extra_terms", refuse)
    p0 = torch.randn(2053)
    seeds, coefs = [1, 2, 3, 4][: Z.SCALAR_TERMS], [0.1, -0.2, 0.3, -0.4][: Z.SCALAR_TERMS]
    out = run("triton", p0.clone(), seeds, coefs, 3, -0.01, triton_device=triton_device)
    ref = reference(p0, seeds, coefs, 3, -0.01)
    assert_close_verbose(out, ref, atol=4e-6, rtol=0, name="4 scalar terms")
    with pytest.raises(AssertionError, match="term tensor"):
        run("triton", p0.clone(), [*seeds, 5], [*coefs, 0.5], 3, 0.0, triton_device=triton_device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rademacher(backend, triton_device):
    p0 = torch.randn(1031)
    out = run(backend, p0.clone(), [4], [0.5], 2, 0.0, dist="rademacher", triton_device=triton_device)
    torch.testing.assert_close(out.double(), reference(p0, [4], [0.5], 2, 0.0, "rademacher"), rtol=0, atol=1e-6)


def test_perturb_flip_restore_round_trip():
    """+εz, -2εz, +εz returns to θ up to a few fp32 roundings (what a skipped step restores)."""
    theta = torch.randn(10_001)
    p = theta.clone()
    for a in (1e-3, -2e-3, 1e-3):
        Z.zo_perturb_(p, [42], [a], stream=1)
    ulp = torch.finfo(torch.float32).eps * theta.abs().clamp_min(1e-3)
    assert ((p - theta).abs() <= 4 * ulp + 1e-9).all()


def test_permuted_layout_uses_memory_order():
    w = torch.randn(37, 53)
    w0 = w.clone()
    t = w.t()  # a dense, non-contiguous parameter
    Z.zo_perturb_(t, [3], [0.1], stream=4)
    torch.testing.assert_close(w.flatten().double(), reference(w0.flatten(), [3], [0.1], 4, 0.0), rtol=0, atol=1e-6)


def test_dispatcher_validates():
    with pytest.raises(TypeError, match="int64"):
        Z.zo_perturb_(torch.zeros(4, dtype=torch.int64), [1], [1.0])
    with pytest.raises(ValueError, match="2 seeds but 1 coefficients"):
        Z.zo_perturb_(torch.zeros(4), [1, 2], [1.0])
    with pytest.raises(ValueError, match="offset must be >= 0"):
        Z.zo_perturb_(torch.zeros(4), [1], [1.0], offset=-4)
    with pytest.raises(ValueError, match="gaps or overlaps"):
        Z.zo_perturb_(torch.zeros(8)[::2], [1], [1.0])
    with pytest.raises(ValueError, match="not supported"):
        Z.zo_perturb_(torch.zeros(4, device="meta"), [1], [1.0])
    empty = torch.zeros(0)
    assert Z.zo_perturb_(empty, [1], [1.0]) is empty


def test_falls_back_to_torch_with_one_warning(monkeypatch):
    p0 = torch.randn(2049)
    expected = run("cpp", p0.clone(), [7], [0.2], 3, -0.1)
    monkeypatch.setattr(Z, "cpp_available", lambda: False)
    monkeypatch.setattr(memtrain._cpp, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falls back to plain torch"):
        out = Z.zo_perturb_(p0.clone(), [7], [0.2], stream=3, c=-0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Z.zo_perturb_(p0.clone(), [7], [0.2], stream=3, c=-0.1)  # warned once only
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_no_tensor_sized_temporaries(backend, tmp_path):
    """Peak RSS of a fresh process grows by far less than the parameter's size while updating it."""
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build")
    n = 100_000_000 if backend == "cpp" else 20_000_000  # 400 MB / 80 MB (the torch twin is slow)
    code = textwrap.dedent(f"""
        import resource, torch
        from memtrain.kernels import zo_perturb as Z
        p = torch.ones({n})
        Z._zo_perturb_{backend}(p[:1000], [1], [1.0], 0, 0.0, 0, 0)  # load everything once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Z._zo_perturb_{backend}(p, [1, 2], [1e-3, 1e-3], 0, -1e-4, 0, 0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    # cwd: a python -c run from the checkout would import its uninstalled sources
    grown = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                               cwd=tmp_path).stdout)
    assert grown < 0.25 * 4 * n, f"peak memory grew by {grown / 1e6:.0f} MB while updating {4 * n / 1e6:.0f} MB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", ["update+perturb", "six"])
def test_cuda_matches_cpu(dtype, terms):
    """The compiled kernel against the CPU backend (C++, else the torch twin), through the public dispatcher.

    Rule (derived; the design gives equality): the noise z may differ by one fp32 ulp (|z| <= 5.77, so by at
    most 2^-21), which moves the fp32/fp64 update by at most Σ_j |a_j| · 2^-21 before one final rounding
    (one ulp of the result). A bf16/fp16 result is the fp32 update rounded once, so it may differ by one ulp
    of the dtype, and only where the fp32 values differ."""
    seeds, coefs, c = TERMS[terms]
    p0 = torch.randn(1_000_003).to(dtype)
    cpu = Z.zo_perturb_(p0.clone(), seeds, coefs, stream=9, c=c, offset=3)
    gpu = Z.zo_perturb_(p0.cuda(), seeds, coefs, stream=9, c=c, offset=3).cpu()
    diff = (gpu.double() - cpu.double()).abs()
    ulp = torch.finfo(dtype).eps * cpu.double().abs()
    if dtype in (torch.float32, torch.float64):
        bound = sum(abs(a) for a in coefs) * 2.0**-21 + ulp
    else:
        bound = ulp
    assert (diff <= bound).all(), f"{(diff > bound).sum()} elements beyond the rule; max {diff.max():.3g}"
