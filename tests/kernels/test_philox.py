"""The noise stream z(seed, stream, i): Philox known answers, every backend against the NumPy reference,
distribution statistics and independence."""

import numpy as np
import pytest
import torch
from scipy import stats

from memtrain._cpp import cpp_available
from memtrain.kernels import philox as P
from memtrain.testing import PHILOX_KAT, philox4x32_10_numpy, philox_noise_numpy, philox_words_numpy

BACKENDS = ["cpp", "torch", "triton"]
SEEDS = [0, 1, 0xF23456789ABCDEF0]
# odd sizes and offsets that are not multiples of the Philox block (4) or of kernel blocks (256 / 1024)
SIZES_OFFSETS = [(1, 0), (7, 3), (1031, 0), (1031, 5), (4097, 2**33 + 1)]


def fill(backend: str, out: torch.Tensor, seed: int, stream: int, dist: str, offset: int,
         triton_device: str = "cpu") -> torch.Tensor:
    """Run one backend into ``out`` (CPU); the Triton launcher gets a copy on ``triton_device``."""
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build; see the install log")
    if backend == "triton" and not P.HAS_TRITON:
        pytest.skip("triton is not installed")
    target = out.to(triton_device) if backend == "triton" else out
    getattr(P, f"_philox_fill_{backend}")(target, seed, stream, P.dist_code(dist), offset)
    if target is not out:
        out.copy_(target.cpu())
    return out


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_known_answers_numpy_and_torch(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10_numpy(counter, key)) == expected
    words = P.philox4x32_10_torch(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.skipif(not P.HAS_TRITON, reason="triton is not installed")
def test_triton_philox_words_bitwise():
    import triton
    import triton.language as tl

    @triton.jit
    def words_kernel(out_ptr, words_ptr, N: tl.constexpr):
        stream_lo = P._load_key(words_ptr, 0)
        stream_hi = P._load_key(words_ptr, 1)
        seed_lo = P._load_key(words_ptr, 2)
        seed_hi = P._load_key(words_ptr, 3)
        counter = tl.arange(0, N).to(tl.int64) + 2**32 - 3  # crosses the low word's wrap
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = (counter >> 32).to(tl.uint32)
        c2 = tl.zeros_like(c0) + stream_lo
        c3 = tl.zeros_like(c0) + stream_hi
        w0, w1, w2, w3 = P._philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
        idx = tl.arange(0, N) * 4
        tl.store(out_ptr + idx, w0.to(tl.int64))
        tl.store(out_ptr + idx + 1, w1.to(tl.int64))
        tl.store(out_ptr + idx + 2, w2.to(tl.int64))
        tl.store(out_ptr + idx + 3, w3.to(tl.int64))

    seed, stream = 0xF23456789ABCDEF0, 0x1234_0000_0007
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(64 * 4, dtype=torch.int64, device=device)
    words = torch.tensor([*P.int32_words(stream), *P.int32_words(seed)], dtype=torch.int32, device=device)
    words_kernel[(1,)](out, words, N=64)
    expected = philox_words_numpy(seed, stream, 64 * 4, offset=4 * (2**32 - 3))
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.uint32), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel,offset", SIZES_OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_normal_matches_reference(backend, numel, offset, seed, triton_device):
    stream = 2**40 + 11
    out = fill(backend, torch.empty(numel), seed, stream, "normal", offset, triton_device)
    ref = philox_noise_numpy(seed, stream, numel, offset)
    # fp32 Box-Muller against float64: a few ulp of |z| <= 5.77
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel,offset", SIZES_OFFSETS)
def test_rademacher_matches_reference_bitwise(backend, numel, offset, triton_device):
    out = fill(backend, torch.empty(numel), 5, 3, "rademacher", offset, triton_device)
    np.testing.assert_array_equal(out.numpy(), philox_noise_numpy(5, 3, numel, offset, "rademacher"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_low_and_high_precision(backend, dtype, triton_device):
    out = fill(backend, torch.empty(1031, dtype=dtype), 9, 1, "normal", 0, triton_device)
    ref = torch.from_numpy(philox_noise_numpy(9, 1, 1031, 0))
    # the stored value is the fp32 z rounded once to the dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0 if dtype != torch.float64 else 2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_agree_bitwise(dtype, triton_device):
    """C++, the torch twin and the Triton interpreter do the same fp32 operations with the same roundings and
    no FMA contraction (setup.py: -ffp-contract=off, no -ffast-math), so z is the same bits. A compiled GPU
    kernel is held to 1 ulp by test_cuda_noise_matches_cpu."""
    outs = {b: fill(b, torch.empty(100_003, dtype=dtype), 77, 2, "normal", 1) for b in ("cpp", "torch")}
    if triton_device == "cpu" and P.HAS_TRITON:
        outs["triton"] = fill("triton", torch.empty(100_003, dtype=dtype), 77, 2, "normal", 1)
    for name, out in outs.items():
        assert torch.equal(out, outs["cpp"]), f"{name} differs from cpp in {(out != outs['cpp']).sum()} elements"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between fp32 tensors of the same sign (integer bit patterns)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_cuda_noise_matches_cpu(dist):
    """The compiled Triton kernel against the CPU backend on 2^22 + 3 elements at a high offset.

    fp32: at most 1 ulp apart (the design gives 0: tl.div_rn / tl.sqrt_rn and no FMA contraction).
    bf16 (derived): each stored value is its fp32 z rounded once to bf16, so where the fp32 values agree the
    bf16 values are equal, and where they differ by 1 fp32 ulp the roundings can differ by at most one bf16
    ulp (only when the two straddle a bf16 rounding boundary)."""
    n, offset, seed, stream = 2**22 + 3, 2**33 + 5, 0xF23456789ABCDEF0, 2**40 + 11
    backend = "cpp" if cpp_available() else "torch"
    cpu32 = fill(backend, torch.empty(n), seed, stream, dist, offset)
    gpu32 = P.philox_fill_(torch.empty(n, device="cuda"), seed, stream, dist, offset).cpu()
    same_sign = torch.sign(cpu32) == torch.sign(gpu32)
    assert same_sign.all()
    ulps = _ulps(cpu32, gpu32)
    assert ulps.max().item() <= 1, f"{(ulps > 1).sum()} elements more than 1 ulp apart"
    cpu16 = fill(backend, torch.empty(n, dtype=torch.bfloat16), seed, stream, dist, offset)
    gpu16 = P.philox_fill_(torch.empty(n, dtype=torch.bfloat16, device="cuda"), seed, stream, dist, offset).cpu()
    differs16 = cpu16 != gpu16
    assert not (differs16 & (ulps == 0)).any(), "bf16 differs where the fp32 z agree"
    bf16_ulp = torch.finfo(torch.bfloat16).eps * cpu16.float().abs()
    assert ((cpu16.float() - gpu16.float()).abs() <= bf16_ulp).all()


def test_standard_normal_statistics():
    z = fill("cpp", torch.empty(400_000), 123, 0, "normal", 0).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 0.01
    assert np.abs(z).max() <= 5.8  # the transform's support
    # lanes 0..3 of a counter come from different words: each lane alone is standard normal too
    for lane in range(4):
        assert stats.kstest(z[lane::4], "norm").pvalue > 1e-3


def test_rademacher_balance():
    r = fill("cpp", torch.empty(400_000), 123, 0, "rademacher", 0).numpy()
    assert set(np.unique(r)) == {-1.0, 1.0}
    assert abs(r.mean()) < 5 / np.sqrt(r.size)


@pytest.mark.parametrize(
    "other",
    [
        {"seed": 124, "stream": 0, "offset": 0},  # next seed
        {"seed": 123, "stream": 1, "offset": 0},  # next parameter
        {"seed": 123, "stream": 0, "offset": 200_000},  # further along the same stream
    ],
    ids=["seed", "stream", "offset"],
)
def test_independence(other):
    n = 200_000
    a = fill("cpp", torch.empty(n), 123, 0, "normal", 0).double().numpy()
    b = fill("cpp", torch.empty(n), other["seed"], other["stream"], "normal", other["offset"]).double().numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)
    # the joint distribution is the product: the sum of two independent N(0,1) is N(0, 2)
    assert stats.kstest((a + b) / np.sqrt(2), "norm").pvalue > 1e-3


def test_offset_addresses_the_same_stream():
    whole = fill("cpp", torch.empty(1000), 3, 4, "normal", 0)
    part = fill("cpp", torch.empty(333), 3, 4, "normal", 501)
    torch.testing.assert_close(part, whole[501:834], rtol=0, atol=0)


def test_dispatcher_and_errors():
    out = P.philox_fill_(torch.empty(3, 5), seed=1, stream=2)
    torch.testing.assert_close(out.flatten(), torch.from_numpy(philox_noise_numpy(1, 2, 15)).float(), rtol=0, atol=2e-6)
    with pytest.raises(TypeError, match="int32"):
        P.philox_fill_(torch.empty(4, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="dist must be one of"):
        P.philox_fill_(torch.empty(4), 1, dist="uniform")
    with pytest.raises(ValueError, match="offset must be >= 0"):
        P.philox_fill_(torch.empty(4), 1, offset=-1)
    with pytest.raises(ValueError, match="gaps or overlaps"):
        P.philox_fill_(torch.empty(4, 6)[:, ::2], 1)
