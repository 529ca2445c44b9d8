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


def fill(backend: str, out: torch.Tensor, seed: int, stream: int, dist: str, offset: int) -> torch.Tensor:
    if backend == "cpp" and not cpp_available():
        pytest.fail("the C++ extension did not build; see the install log")
    if backend == "triton" and not P.HAS_TRITON:
        pytest.skip("triton is not installed")
    getattr(P, f"_philox_fill_{backend}")(out, seed, stream, P.dist_code(dist), offset)
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
    words_kernel[(1,)](out, P.key_words(stream, [seed], out.device), N=64)
    expected = philox_words_numpy(seed, stream, 64 * 4, offset=4 * (2**32 - 3))
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.uint32), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel,offset", SIZES_OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_normal_matches_reference(backend, numel, offset, seed):
    stream = 2**40 + 11
    out = fill(backend, torch.empty(numel), seed, stream, "normal", offset)
    ref = philox_noise_numpy(seed, stream, numel, offset)
    # fp32 Box-Muller against float64: a few ulp of |z| <= 5.77
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel,offset", SIZES_OFFSETS)
def test_rademacher_matches_reference_bitwise(backend, numel, offset):
    out = fill(backend, torch.empty(numel), 5, 3, "rademacher", offset)
    np.testing.assert_array_equal(out.numpy(), philox_noise_numpy(5, 3, numel, offset, "rademacher"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_low_and_high_precision(backend, dtype):
    out = fill(backend, torch.empty(1031, dtype=dtype), 9, 1, "normal", 0)
    ref = torch.from_numpy(philox_noise_numpy(9, 1, 1031, 0))
    # the stored value is the fp32 z rounded once to the dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0 if dtype != torch.float64 else 2e-6)


def test_backends_agree_to_rounding():
    a = fill("cpp", torch.empty(100_003), 77, 2, "normal", 1)
    b = fill("torch", torch.empty(100_003), 77, 2, "normal", 1)
    assert (a - b).abs().max().item() <= 1e-6


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
