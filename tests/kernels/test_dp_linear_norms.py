"""dp_linear_norms: Triton (interpreter on CPU, compiled on a GPU) and torch/cuBLAS paths against a float64
per-sample reference; the grid of every launch within CUDA's limits; CUDA precision against float64."""

import math

import pytest
import torch

from memtrain.kernels import _launch
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
def test_triton_path(shape, method, triton_device):
    pytest.importorskip("triton")
    B, T, d_in, d_out = shape
    G, X = torch.randn(B, T, d_out), torch.randn(B, T, d_in)
    got = K._dp_linear_norms_triton(G.to(triton_device), X.to(triton_device), True, method).cpu()
    torch.testing.assert_close(got.double(), _reference(G, X, True), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, K._dp_linear_norms_torch(G, X, True, method), rtol=1e-5, atol=1e-4)


# Every tile the autotuner may pick, plus the ghost kernel's CUDA tile: masks and multi-tile sums at the sizes
# the GPU runs (the interpreter otherwise uses one 32x32 tile).
CONFIGS = [("direct", {"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t}) for o, i, t, _, _ in K._DIRECT_FP32[:2]] + [
    ("direct", {"BLOCK_O": 128, "BLOCK_I": 128, "BLOCK_T": 64}),
    ("ghost", {"BLOCK_T": K._CUDA_GHOST["BLOCK_T"], "BLOCK_K": K._CUDA_GHOST["BLOCK_K"]}),
    ("ghost", {"BLOCK_T": 16, "BLOCK_K": 16}),
]


@pytest.mark.parametrize("method,config", CONFIGS, ids=lambda c: c if isinstance(c, str) else "x".join(
    str(v) for v in c.values()))
def test_triton_tiles(method, config, triton_device):
    """Shapes spanning several tiles of each size in every dimension, with ragged edges."""
    pytest.importorskip("triton")
    B, T, d_in, d_out = 2, 150, 131, 70
    G, X = torch.randn(B, T, d_out), torch.randn(B, T, d_in)
    got = K._dp_linear_norms_triton(G.to(triton_device), X.to(triton_device), False, method, config=config).cpu()
    torch.testing.assert_close(got.double(), _reference(G, X, False), rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_triton_bf16(method, triton_device):
    """16-bit inputs: exact products (tensor cores; widened under the interpreter), fp32 sums."""
    pytest.importorskip("triton")
    G, X = torch.randn(3, 40, 70).bfloat16(), torch.randn(3, 40, 45).bfloat16()
    got = K._dp_linear_norms_triton(G.to(triton_device), X.to(triton_device), True, method).cpu()
    torch.testing.assert_close(got.double(), _reference(G, X, True), rtol=1e-5, atol=1e-3)


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
    with pytest.raises(ValueError, match="unknown method"):  # refused before the empty-batch shortcut too
        K._dp_linear_norms_torch(torch.randn(0, 3, 4), torch.randn(0, 3, 4), False, "magic")


# ------------------------------------------------------------------------------------------ grid limits
# A Llama-size LM head (4096 -> 32000) switches from ghost to direct at T = 3632; the former grid
# (B, n_o·n_i) then put 128000 programs on axis 1, past CUDA's 65535.
BIG = [(1, 3631, 4096, 32000), (1, 3632, 4096, 32000), (8, 8192, 4096, 32000), (64, 4096, 4096, 128256),
       (16, 32768, 8192, 8192)]


@pytest.mark.parametrize("shape", BIG, ids=lambda s: "x".join(map(str, s)))
def test_grids_fit_cuda_limits(shape):
    B, T, d_in, d_out = shape
    for o, i, _, _, _ in [*K._DIRECT_FP32, *K._DIRECT_16BIT, (32, 32, 16, 0, 0)]:
        grid = K.direct_grid(B, d_out, d_in, o, i)
        assert len(grid) == 1 and grid[0] == B * -(-d_out // o) * -(-d_in // i)
    for bt in (16, K._CUDA_GHOST["BLOCK_T"]):
        grid = K.ghost_grid(B, T, bt)
        assert len(grid) == 1 and grid[0] == B * (-(-T // bt)) ** 2


class _RecordingKernel:
    """Stands in for a Triton kernel: records each launch's grid instead of running it."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid(kwargs) if callable(grid) else grid)

        return launch


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_launcher_grid_for_an_lm_head(method, monkeypatch):
    """The launcher's grid for B=2, T=3632, 4096 -> 32000 (meta tensors: nothing runs or is allocated)."""
    rec = _RecordingKernel()
    monkeypatch.setattr(K, f"_dp_linear_norms_{method}_kernel", rec)
    monkeypatch.setattr(K, "require_triton_device", lambda *a: None)
    monkeypatch.setattr(K, "interpreting", lambda: True)  # the fixed-tile launch (autotuned tiles: test above)
    G = torch.empty(2, 3632, 32000, device="meta")
    X = torch.empty(2, 3632, 4096, device="meta")
    K._dp_linear_norms_triton(G, X, False, method)
    (grid,) = rec.grids
    assert len(grid) == 1 and grid[0] <= _launch.GRID_LIMITS[0]


def test_checked_grid_names_the_axis():
    assert _launch.checked_grid([5, 65535, 1], "op") == (5, 65535, 1)
    with pytest.raises(ValueError, match=r"op: grid axis 1 needs 65536 programs but CUDA allows at most 65535"):
        _launch.checked_grid((1, 65536), "op")
    with pytest.raises(ValueError, match="grid axis 0 needs 2147483648"):
        _launch.checked_grid((2**31,), "op", "B=1")
    with pytest.raises(ValueError, match="1 to 3 axes"):
        _launch.checked_grid((1, 1, 1, 1), "op")


def test_triton_launcher_refuses_cpu_tensors_when_compiled(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors, got one on cpu"):
        _launch.require_triton_device("dp_linear_norms", torch.zeros(1))


# ------------------------------------------------------------------------------------------ CUDA precision
def _torch_same_dtype(G, X, method):
    """What plain torch computes in the inputs' dtype (cuBLAS, 16-bit results for 16-bit inputs)."""
    if method == "ghost":
        gg = torch.bmm(G, G.transpose(1, 2)).float()
        xx = torch.bmm(X, X.transpose(1, 2)).float()
        return (gg * xx).sum((1, 2))
    return torch.stack([(g.t() @ x).float().square().sum() for g, x in zip(G, X, strict=True)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["direct-triton", "ghost-cublas", "ghost-triton"])
def test_cuda_precision_against_float64(path, dtype, fp32_matmul_exact):
    """flash-attn's rule: error <= 2 x the error of plain torch in the same dtype + a small atol. A TF32 dot
    (10-bit mantissa) in an fp32 path misses it by two orders of magnitude."""
    method, backend = path.split("-")
    B, T, d_in, d_out = 4, 300, 384, 520
    G = torch.randn(B, T, d_out, device="cuda").to(dtype)
    X = torch.randn(B, T, d_in, device="cuda").to(dtype)
    ref = _reference(G, X, False)
    if backend == "triton":
        got = K._dp_linear_norms_triton(G, X, False, method)
    else:
        got = K._dp_linear_norms_torch(G, X, False, method)
    err = (got.double() - ref).abs().max().item()
    err_torch = (_torch_same_dtype(G, X, method).double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * ref.abs().max().item(), (err, err_torch)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", ["direct-grid-limit", "ghost-grid-limit", "2^31-elements"])
def test_cuda_at_the_limits(case):
    """The shapes that broke the former kernels: an LM head at T = 3632 (direct form; 128000 tiles of 32x32
    on axis 1 before), the Triton ghost kernel at T = 4096 (cdiv(T, 16)² = 65536 tiles on axis 1 before) and
    a gradient of more than 2^31 elements (int32 offsets wrapped). The float64 reference runs one sample at
    a time."""
    if case == "direct-grid-limit":
        B, T, d_in, d_out = 2, 3632, 4096, 32000
    elif case == "ghost-grid-limit":
        B, T, d_in, d_out = 2, 4096, 256, 320
    else:
        B, T, d_in, d_out = 66, 262, 512, 128256  # B·T·out = 2.2e9 > 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(B, T, d_out, device="cuda", dtype=torch.bfloat16, generator=g)
    X = torch.randn(B, T, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
    if case == "ghost-grid-limit":
        got = K._dp_linear_norms_triton(G, X, True, "ghost")
    else:
        got = K.dp_linear_norms(G, X, with_bias=True, method="direct")
    # Worst-case fp32 bound: T·2⁻²⁴ per product entry (doubled by squaring) plus (log2(tile) + tiles)·2⁻²⁴ for
    # the sums of squares: below 1e-3 for both shapes (typical errors are ~1e-6). A wrapped offset reads
    # other samples' rows or faults: errors of order 1.
    # The ghost sum ⟨GGᵀ, XXᵀ⟩ has terms of both signs: its bound is (log2(64²) + 64²/2 tiles)·2⁻²⁴ plus
    # d·2⁻²⁴ for the Gram entries, relative to Σ|terms|: 2.5e-4 · Σ|terms|.
    for b in (0, B // 2, B - 1):
        p = G[b].double().t() @ X[b].double()
        bias = G[b].double().sum(0).square().sum()
        ref = p.square().sum() + bias
        if case == "ghost-grid-limit":
            gg, xx = G[b].double() @ G[b].double().t(), X[b].double() @ X[b].double().t()
            tol = 2.5e-4 * (gg * xx).abs().sum().item() + 1e-6 * bias.item()
        else:
            tol = 1e-3 * ref.item()
        assert abs(got[b].item() - ref.item()) <= tol, (b, got[b].item(), ref.item())


def _blocked_ghost_rtol(T: int, d_in: int, d_out: int) -> float:
    """Relative rounding bound of the blocked ghost norm on positive inputs (see the test below), u = 2⁻²⁴."""
    blocks = -(-T // K._gram_block_width(T))
    return (d_in + d_out + math.log2(T * T) + 16 + blocks) * 2.0 ** -24


# T at and past the blocking threshold: one block (95), two uneven blocks (131: 64 + 64 + 3 rows), and more
# blocks of a width that is not a multiple of T (300: width 64, five blocks; 1100: width 144, eight blocks).
@pytest.mark.parametrize("T", [95, 131, 300, 1100])
def test_ghost_block_triangle_against_float64(T):
    """The blocked lower-triangle Grams against a float64 per-sample reference, on positive inputs.

    With every entry of G and X positive, every term of ⟨GGᵀ, XXᵀ⟩ is positive: a block counted once instead
    of twice (or twice instead of once), a missed or repeated row moves the result by far more than rounding.
    Rounding bound: each Gram entry is a d-term fp32 dot product (relative error ≤ d·u, u = 2⁻²⁴), and the T²
    products are summed per block and then across blocks (blocked reductions: ≤ (log2(T²) + 16 + blocks)·u);
    all terms being positive, these relative bounds hold for the whole sum.
    """
    B, d_in, d_out = 2, 37, 19
    G, X = torch.rand(B, T, d_out), torch.rand(B, T, d_in)
    blocks = len(K.gram(X).blocks)
    assert blocks == -(-T // K._gram_block_width(T)) and (blocks > 1) == (T >= 96)
    rtol = _blocked_ghost_rtol(T, d_in, d_out)
    ref = _reference(G, X, True)
    got = K._dp_linear_norms_torch(G, X, True, "ghost")
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=0)
    shared = K._dp_linear_norms_torch(G, X, True, "ghost", x_gram=K.gram(X))  # the cached-Gram path
    torch.testing.assert_close(shared.double(), ref, rtol=rtol, atol=0)
    full = K.gram(X).full()
    torch.testing.assert_close(full.double(), X.double() @ X.double().transpose(1, 2), rtol=d_in * 2.0 ** -24,
                               atol=0)


def test_ghost_batch_chunks_share_the_cached_gram(monkeypatch):
    """Samples split over several chunks read their own rows of a shared Gram (a wrong slice would mix samples)."""
    monkeypatch.setattr(K, "_chunk", lambda per_sample_bytes, budget=0: 2)
    B, T = 5, 100
    G, X = torch.rand(B, T, 11), torch.rand(B, T, 13)
    ref = _reference(G, X, False)
    got = K._dp_linear_norms_torch(G, X, False, "ghost", x_gram=K.gram(X))
    torch.testing.assert_close(got.double(), ref, rtol=_blocked_ghost_rtol(T, 13, 11), atol=0)


# ------------------------------------------------------------------------------------------ determinism
def test_norm_kernels_add_no_atomics():
    """docs/flashdp.md promises the same bits on every run on one GPU: tile sums go to slots of their own and
    are summed in a fixed order, never through an atomic add (whose order varies)."""
    import inspect

    assert "atomic_add" not in inspect.getsource(K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4096, 32000), (37, 45), (130, 64)])
def test_slots_cover_every_tiling_the_autotuner_may_launch(shape, dtype, monkeypatch):
    """A program writes slot b·SLOTS + tile: SLOTS must hold the tile count of every configuration."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    d_out, d_in = shape
    slots = K._slots("direct", None, 17, d_in, d_out, dtype)
    tiles = K._DIRECT_16BIT if dtype == torch.bfloat16 else K._DIRECT_FP32
    assert slots == max(math.ceil(d_out / o) * math.ceil(d_in / i) for o, i, *_ in tiles)
    assert K._slots("ghost", None, 130, d_in, d_out, dtype) == math.ceil(130 / K._CUDA_GHOST["BLOCK_T"]) ** 2
    assert K._slots("direct", {"BLOCK_O": 64, "BLOCK_I": 32}, 17, d_in, d_out, dtype) == (
        math.ceil(d_out / 64) * math.ceil(d_in / 32))


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_triton_norms_equal_the_sum_of_their_slots(method, triton_device):
    """Odd shapes, several tiles per sample: the slots' sum is the norm (against float64 per sample)."""
    g = torch.Generator().manual_seed(3)
    G = torch.randn(3, 37, 70, generator=g).to(triton_device)
    X = torch.randn(3, 37, 45, generator=g).to(triton_device)
    got = K._dp_linear_norms_triton(G, X, False, method).cpu().double()
    ref = torch.stack([(gb.double().t() @ xb.double()).square().sum() for gb, xb in zip(G.cpu(), X.cpu(), strict=True)])
    # fp32 sums of T·(in or out) ≤ 3.2e3 exact products per tile, then ≤ 9 tile sums: relative error ≤ ~1e-6
    # each for random signs; 1e-5 leaves 10x room
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_cuda_norms_are_the_same_bits_on_every_run(method, dtype):
    """Many tiles per sample (4096 x 4096 in ≤ 128 x 128 tiles, T = 512): atomics would vary the last bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(4, 512, 4096, device="cuda", generator=g).to(dtype)
    X = torch.randn(4, 512, 4096, device="cuda", generator=g).to(dtype)
    first = K._dp_linear_norms_triton(G, X, False, method)
    for _ in range(5):
        assert torch.equal(K._dp_linear_norms_triton(G, X, False, method), first)
