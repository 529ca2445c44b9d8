"""dp_clip_once_: the chunked torch path (CPU, and CUDA layers the kernel does not serve) and the cooperative
CUDA kernel against an independent float64 per-sample loop; the CUDA kernel's build, refusal and reasons."""

import os
import pathlib
import subprocess
import time

import pytest
import torch
import torch.utils.cpp_extension

from memtrain.kernels import dp_clip_once as O


def per_sample_reference(G, X, max_norm, scale, with_bias, layout="out_in"):
    """float64 loop over samples: g_b = scale·G_bᵀX_b (+ bias scale·Σ_t G_b[t]), c_b = min(1, C / (‖g_b‖ + 1e-6)),
    Σ_b c_b g_b. Returns (grad_w, grad_b, raw squared norms ‖G_bᵀX_b‖² + ‖Σ_t G_b[t]‖²)."""
    B, _, d_out = G.shape
    d_in = X.shape[2]
    gw = torch.zeros(d_out, d_in, dtype=torch.float64)
    gb = torch.zeros(d_out, dtype=torch.float64)
    raw = []
    for b in range(B):
        w_b = G[b].double().t() @ X[b].double()
        bias_b = G[b].double().sum(0) if with_bias else torch.zeros(d_out, dtype=torch.float64)
        sq = w_b.square().sum() + bias_b.square().sum()
        c = min(1.0, max_norm / (scale * sq.sqrt().item() + 1e-6))
        gw += c * scale * w_b
        gb += c * scale * bias_b
        raw.append(sq.item())
    return (gw if layout == "out_in" else gw.t()), gb, torch.tensor(raw, dtype=torch.float64)


def mixed_magnitudes(B, T, d_out, d_in, seed=0):
    """Samples whose gradient norms span orders of magnitude, so a threshold clips some and not others."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(B, T, d_out, generator=g) * torch.logspace(-1, 1, B).view(B, 1, 1)
    X = torch.randn(B, T, d_in, generator=g)
    return G, X


def check(G, X, scale, with_bias, layout, **kw):
    """The chunked path against the per-sample loop, with a threshold (the median sample gradient norm) that
    clips about half of the samples."""
    B, _, d_out = G.shape
    d_in = X.shape[2]
    norms = scale * per_sample_reference(G, X, 1.0, scale, with_bias)[2].sqrt()
    max_norm = norms.median().item()
    gw = torch.zeros((d_out, d_in) if layout == "out_in" else (d_in, d_out))
    gb = torch.zeros(d_out) if with_bias else None
    sq = O._dp_clip_once_torch(G, X, gw, gb, max_norm, scale, layout, **kw)
    rw, rb, rsq = per_sample_reference(G, X, max_norm, scale, with_bias, layout)
    clipped = (norms > max_norm).sum().item()
    assert 0 < clipped < B, "the threshold must clip some samples and leave others"
    torch.testing.assert_close(sq.double(), rsq, rtol=1e-5, atol=1e-6)
    # fp32 GEMMs of T-long dot products against float64: a few ulp of the largest entry
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5 * rw.abs().max().item())
    if with_bias:
        torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-5 * rb.abs().max().item())


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_several_chunks_at_the_default_budget(layout, with_bias):
    """d = 2048: one sample's gradient is 16 MiB, so the 32 MiB budget gives chunks of 2, 2, 1 samples."""
    B, T, d = 5, 3, 2048
    assert O._chunk(d * d * 4) == 2  # the premise: 3 chunks, the last one short
    G, X = mixed_magnitudes(B, T, d, d)
    check(G, X, scale=2.0, with_bias=with_bias, layout=layout)


@pytest.mark.parametrize("budget_samples", [1, 3, 6])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_chunk_budgets_and_odd_shapes(budget_samples, layout):
    B, T, d_in, d_out = 7, 5, 37, 19
    G, X = mixed_magnitudes(B, T, d_out, d_in, seed=1)
    budget = budget_samples * d_in * d_out * 4
    assert O._chunk(d_in * d_out * 4, budget) == budget_samples
    check(G, X, scale=3.0, with_bias=True, layout=layout, budget=budget)


def test_dispatcher_on_cpu_and_empty_batch():
    G, X = mixed_magnitudes(4, 6, 9, 11)
    gw, gb = torch.zeros(9, 11), torch.zeros(9)
    O.dp_clip_once_(G, X, gw, gb, 5.0, 1.0)
    rw, rb, _ = per_sample_reference(G, X, 5.0, 1.0, True)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-5)
    empty = O.dp_clip_once_(G[:0], X[:0], gw, gb, 5.0, 1.0)
    assert empty.shape == (0,)


# ------------------------------------------------------------------------------------------ CUDA kernel: CPU checks
def test_reason_names_the_layers_the_kernel_does_not_serve():
    assert "bias" in O.cuda_once_reason(64, 64, has_bias=True)
    assert "bfloat16" in O.cuda_once_reason(64, 64, dtype=torch.bfloat16)
    assert "in_out" in O.cuda_once_reason(64, 64, layout="in_out")
    assert not O.cuda_once_fits(64, 64, has_bias=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_nothing_is_built(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("prepare() must not compile without a CUDA device")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", forbidden)
    monkeypatch.setattr(O, "_KERNEL", O._CudaKernel())
    assert O.prepare() is False
    assert O.cuda_once_status() == "unavailable: no CUDA device"
    assert O.cuda_once_reason(64, 64) == "unavailable: no CUDA device"
    assert not O.cuda_once_fits(64, 64)


@pytest.mark.parametrize("exc", [
    OSError("CUDA_HOME environment variable is not set"),
    ImportError("libcudart.so.12: cannot open shared object file"),
    RuntimeError("Error building extension 'memtrain_dp_clip'"),
    subprocess.CalledProcessError(1, ["ninja", "-v"]),
], ids=lambda e: type(e).__name__)
def test_a_failed_build_is_reported_once_and_never_retried(exc, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def failing_load(*a, **k):
        calls.append(1)
        raise exc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the build on a CPU-only machine
    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    monkeypatch.setattr(O, "_KERNEL", O._CudaKernel())
    monkeypatch.setattr(O, "_warned", [])
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert O.prepare() is False
    assert O.prepare() is False  # cached: no second build, no second warning
    for _ in range(3):  # what each backward asks
        assert not O.cuda_once_fits(64, 64)
    assert calls == [1]
    status = O.cuda_once_status()
    assert status.startswith("unavailable: build failed") and type(exc).__name__ in status
    assert O.cuda_once_reason(64, 64) == status


def _building(monkeypatch, tmp_path) -> list[dict]:
    """A CUDA machine as far as prepare() can tell, torch's extensions in tmp_path, and a load() that records
    its build directory and whether a lock is there when it is called."""
    seen = []

    def load(*a, build_directory=None, **k):
        seen.append({"dir": build_directory, "locked": (pathlib.Path(build_directory) / "lock").exists()})
        raise RuntimeError("stop after the lock check")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(O, "_KERNEL", O._CudaKernel())
    monkeypatch.setattr(O, "_warned", [True])
    return seen


def test_a_stale_lock_of_a_killed_build_is_cleared(monkeypatch, tmp_path):
    """A build killed mid-way leaves torch's FileBaton lock, and every later load() would wait on it forever."""
    seen = _building(monkeypatch, tmp_path)
    lock = tmp_path / "memtrain_dp_clip" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - O.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="interrupted build"):
        assert O.prepare() is False
    assert seen == [{"dir": str(lock.parent), "locked": False}]


def test_a_fresh_lock_is_left_to_the_build_that_holds_it(monkeypatch, tmp_path):
    seen = _building(monkeypatch, tmp_path)
    lock = tmp_path / "memtrain_dp_clip" / "lock"
    lock.parent.mkdir()
    lock.touch()  # another process compiling now
    assert O.prepare() is False
    assert seen == [{"dir": str(lock.parent), "locked": True}]
    assert O.clear_stale_lock(lock.parent, max_age_s=0) and not lock.exists()  # a caller that saw the builder die


def test_a_missing_ninja_is_named_before_building(monkeypatch, tmp_path):
    seen = _building(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    assert O.prepare() is False
    status = O.cuda_once_status()
    assert seen == [] and "ninja is not installed" in status and "pip install ninja" in status


def test_missing_sources_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(O, "_SOURCES", (tmp_path / "dp_clip_binding.cpp", tmp_path / "dp_clip.cu"))
    monkeypatch.setattr(O, "_KERNEL", O._CudaKernel())
    monkeypatch.setattr(O, "_warned", [True])
    assert O.prepare() is False
    assert "dp_clip.cu" in O.cuda_once_status() and "not found" in O.cuda_once_status()


def test_not_prepared_means_not_chosen(monkeypatch):
    """Before prepare() the kernel is never chosen, and asking (what each backward does) compiles nothing."""
    builds = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *a, **k: builds.append(1))
    monkeypatch.setattr(O, "_KERNEL", O._CudaKernel())
    for _ in range(2):
        assert not O.cuda_once_fits(64, 64)
        assert O.cuda_once_reason(64, 64).startswith("not built: call memtrain.kernels.dp_clip_once.prepare(device)")
    assert builds == []


# ------------------------------------------------------------------------------------------ CUDA kernel on a GPU
@pytest.mark.gpu
def test_cuda_cooperative_kernel_against_float64(fp32_matmul_exact):
    """fp32 FMA arithmetic: error <= 2 x plain torch's fp32 error (per-sample GEMMs, TF32 off) + small atol."""
    assert O.prepare("cuda"), O.cuda_once_status()
    B, T, d_in, d_out = 5, 37, 45, 29
    G, X = mixed_magnitudes(B, T, d_out, d_in)
    assert O.cuda_once_fits(d_out, d_in, torch.device("cuda"))
    gw = torch.zeros(d_out, d_in, device="cuda")
    sq = O._dp_clip_once_cuda(G.cuda(), X.cuda(), gw, None, 5.0, 3.0)
    rw, _, rsq = per_sample_reference(G, X, 5.0, 3.0, False)
    gw_torch = torch.zeros(d_out, d_in, device="cuda")
    O._dp_clip_once_torch(G.cuda(), X.cuda(), gw_torch, None, 5.0, 3.0)
    err, err_torch = (gw.cpu().double() - rw).abs().max(), (gw_torch.cpu().double() - rw).abs().max()
    assert err <= 2 * err_torch + 1e-6 * rw.abs().max(), (err, err_torch)
    torch.testing.assert_close(sq.cpu().double(), rsq, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("refused_by", ["occupancy check", "driver"])
def test_cuda_refused_launch_leaves_no_error_behind(refused_by):
    """A layer whose tiles cannot be co-resident: the launch is refused with a clear error (by the launcher's
    occupancy check, or with the check skipped by cudaLaunchCooperativeKernel itself), and the CUDA error is
    consumed, so the next kernel launched by torch does not report it."""
    assert O.prepare("cuda"), O.cuda_once_status()
    d = 8192  # 65536 tiles: more than any GPU keeps resident
    assert not O.cuda_once_fits(d, d, torch.device("cuda"))
    G, X = torch.randn(1, 2, d, device="cuda"), torch.randn(1, 2, d, device="cuda")
    with pytest.raises(RuntimeError, match="cooperative launch refused"):
        O._KERNEL.module.dp_clip_once(G, X, torch.zeros(d, d, device="cuda"), 1.0, 1.0,
                                      check_occupancy=refused_by == "occupancy check")
    torch.ones(4, device="cuda").add_(1)
    torch.cuda.synchronize()
    gw = torch.zeros(d, d, device="cuda")
    O.dp_clip_once_(G, X, gw, None, 1.0, 1.0)  # the dispatcher takes the chunked path for it
    torch.cuda.synchronize()
