"""int64 element offsets in the DP kernels (memtrain.kernels._common): an LM head's gradient passes 2^31
elements (B·T·V with V = 128256 from B·T = 16.7k), where int32 index arithmetic wraps.

Two checks: the shared offset functions evaluated at such shapes (a probe kernel), and the real kernels run on
strided views whose elements lie past 2^31 (a storage of 3·2^30 bf16 elements: its untouched pages are never
committed, on CPU). Under the interpreter int32 arithmetic wraps as on the GPU (numpy int32), so both fail on
CPU without the int64 promotion; the second one in a subprocess, since a wrapped offset may fault."""

import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from memtrain.kernels._common import _sample_offset, _tile_offsets  # noqa: E402


@triton.jit
def _offsets_probe(out_ptr, b, stride_b, row0, stride_r, col0, stride_c, R: tl.constexpr, C: tl.constexpr):
    # int32 sample, row and column indices, as program_id and tl.arange give them in the kernels
    rows = row0 + tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    offsets = _sample_offset(b, stride_b) + _tile_offsets(rows, stride_r, cols, stride_c)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], offsets)


V = 128256  # Llama-3 vocabulary
CASES = {
    # dp_clip_accumulate: the last rows of G viewed as (B·T, V), B·T = 16800
    "accumulate-rows": dict(b=0, stride_b=0, row0=16800 - 16, stride_r=V, col0=V - 16, stride_c=1),
    # dp_linear_norms: sample 65 of (66, 262, V) (sample base 65·262·V), its last rows and columns
    "norms-sample-base": dict(b=65, stride_b=262 * V, row0=262 - 16, stride_r=V, col0=V - 16, stride_c=1),
    # a single sample of T = 16800 tokens: t·V alone passes 2^31
    "norms-long-sample": dict(b=0, stride_b=0, row0=16800 - 16, stride_r=V, col0=0, stride_c=1),
    # a Conv1D-layout (in, out) gradient of an 8448 -> 256000 head: offs_i · stride_wi with stride_wi = out
    "in-out-weight": dict(b=0, stride_b=0, row0=0, stride_r=1, col0=8448 - 16, stride_c=256000),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_offsets_at_lm_head_shapes(case, triton_device):
    R = C = 16
    out = torch.empty(R, C, dtype=torch.int64, device=triton_device)
    _offsets_probe[(1,)](out, case["b"], case["stride_b"], case["row0"], case["stride_r"], case["col0"],
                         case["stride_c"], R=R, C=C)
    want = torch.tensor([[case["b"] * case["stride_b"] + (case["row0"] + r) * case["stride_r"]
                          + (case["col0"] + c) * case["stride_c"] for c in range(C)] for r in range(R)])
    assert want.max() >= 2**31  # the premise: these offsets need 64 bits
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)


KERNELS_PAST_2_31 = textwrap.dedent("""
    import sys
    import torch
    from memtrain.kernels import dp_clip_accumulate as A
    from memtrain.kernels import dp_linear_norms as N

    device = sys.argv[1]
    STRIDE = 2**30 + 7  # element 2·STRIDE = 2^31 + 14
    base = torch.empty(3 * STRIDE + 64, dtype=torch.bfloat16, device=device)
    torch.manual_seed(0)

    def strided(shape, strides):
        t = base.as_strided(shape, strides)
        t.copy_(torch.randn(shape).to(torch.bfloat16))
        return t

    def ref_norms(G, X):
        return torch.einsum("bto,bti->boi", G.double().cpu(), X.double().cpu()).square().sum((1, 2))

    views = {
        "sample stride": strided((3, 4, 5), (STRIDE, 5, 1)),  # b · stride_gb reaches 2^31 + 14
        "time stride": strided((1, 3, 5), (3 * STRIDE, STRIDE, 1)),  # t · stride_gt reaches 2^31 + 14
    }
    for name, G in views.items():
        X = torch.randn(*G.shape[:2], 6, device=device).to(torch.bfloat16)
        for method in ("direct", "ghost"):
            got = N._dp_linear_norms_triton(G, X, False, method).double().cpu()
            torch.testing.assert_close(got, ref_norms(G, X), rtol=1e-5, atol=1e-5, msg=f"{method}, {name}")
    G = strided((3, 1, 5), (STRIDE, 5, 1))  # rows of (B·T, out) at 0, STRIDE, 2·STRIDE
    X = torch.randn(3, 1, 6, device=device).to(torch.bfloat16)
    coef = torch.tensor([0.5, 2.0, -1.0], device=device)
    gw = torch.zeros(5, 6, device=device)
    A._dp_clip_accumulate_triton(G, X, coef, gw, None, "out_in")
    want = torch.einsum("b,bto,bti->oi", coef.double().cpu(), G.double().cpu(), X.double().cpu())
    # the kernel rounds c·G to bf16 before the dot (2^-8 relative per product)
    torch.testing.assert_close(gw.double().cpu(), want, rtol=1e-2, atol=1e-2, msg="accumulate")
    print("ok")
""")


def test_kernels_on_views_past_2_31_elements(triton_device, tmp_path):
    proc = subprocess.run([sys.executable, "-c", KERNELS_PAST_2_31, triton_device], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode} (a negative code is a signal: a wrapped offset faulted)\n{proc.stderr[-3000:]}")
