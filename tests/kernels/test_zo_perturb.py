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
}


def run(backend, p, seeds, coefs, stream, c, dist="normal", offset=0):
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build; see the install log")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    getattr(Z, f"_zo_perturb_{backend}")(p, seeds, coefs, stream, c, 0 if dist == "normal" else 1, offset)
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
def test_matches_float64_reference(backend, dtype, terms, shape, offset):
    seeds, coefs, c = terms
    p0 = torch.randn(shape).to(dtype)
    out = run(backend, p0.clone(), seeds, coefs, 9, c, offset=offset)
    ref = reference(p0, seeds, coefs, 9, c, offset=offset)
    # flash-attn's rule: error <= 2x that of rounding the exact result to the dtype, plus fp32 noise error
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    assert_close_verbose(out, ref, atol=2 * rounding + 4e-6, rtol=0, name=f"{backend}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_agree_to_one_rounding(dtype):
    """cpp, torch and Triton do the same fp32 operations and round once: results differ by at most one ulp of
    the dtype, and only where FMA contraction moved the fp32 value across a rounding boundary."""
    p0 = torch.randn(4099).to(dtype)
    outs = [run(b, p0.clone(), [11, 5], [0.3, -0.7], 9, -0.01, offset=5) for b in BACKENDS]
    low_precision = dtype in (torch.bfloat16, torch.float16)
    tol = torch.finfo(dtype).eps * 4 if low_precision else 1e-6  # one ulp at |p| < 4; fp32 noise error
    for other in outs[1:]:
        diff = (outs[0].double() - other.double()).abs()
        assert diff.max().item() <= tol
        if low_precision:
            assert (diff > 0).double().mean().item() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_rademacher(backend):
    p0 = torch.randn(1031)
    out = run(backend, p0.clone(), [4], [0.5], 2, 0.0, dist="rademacher")
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
def test_cuda_matches_cpu(dtype):
    p0 = torch.randn(1_000_003).to(dtype)
    cpu = Z.zo_perturb_(p0.clone(), [11, 5], [0.3, -0.7], stream=9, c=-0.01, offset=3)
    gpu = Z.zo_perturb_(p0.cuda(), [11, 5], [0.3, -0.7], stream=9, c=-0.01, offset=3).cpu()
    atol = 0 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=atol)
