"""Every Triton kernel compiles for an NVIDIA GPU (sm_90) on this machine, GPU or not, and its PTX holds what
the sources promise:

- noise kernels (philox_fill_, zo_perturb_): correctly rounded division and square root (div.rn / sqrt.rn,
  no approximate instructions) and no FMA contraction, so z is the bits the C++ and torch twins compute;
- DP kernels: no TF32 in fp32 dots (input_precision="ieee"), tensor-core MMA for bf16, shared memory within
  an H100/H200 block's 227 KiB for every autotuned tile.

Kernels are compiled ahead of time (triton.compile with an explicit target) in a subprocess without
TRITON_INTERPRET, with the specialisation a real launch gets (16-byte aligned pointers, unit strides as
constants, other strides divisible by 16). Needs Triton's NVIDIA backend and its bundled ptxas.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton.backends.nvidia") is not None
pytestmark = pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="Triton's NVIDIA backend is not installed")

SM90_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90

COMPILE = textwrap.dedent('''
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from memtrain.kernels import dp_clip_accumulate as A
    from memtrain.kernels import dp_linear_norms as N
    from memtrain.kernels import philox as P
    from memtrain.kernels import zo_perturb as Z

    FULL = sys.argv[1] == "full"
    TARGET = GPUTarget("cuda", 90, 32)
    results = []

    def build(name, fn, types, constexprs, aligned, **options):
        """types: non-constexpr argument -> Triton type; aligned: arguments a launch sees divisible by 16."""
        signature = {a: types.get(a, "constexpr") for a in fn.arg_names}
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
        ptx = compiled.asm["ptx"]
        results.append({"name": name, "shared": compiled.metadata.shared,
                        "div_rn": "div.rn.f32" in ptx, "sqrt_rn": "sqrt.rn.f32" in ptx,
                        "approx": [s for s in ("div.approx", "div.full", "sqrt.approx", "rsqrt.approx") if s in ptx],
                        "fma": "fma." in ptx, "tf32": "tf32" in ptx, "mma": "mma" in ptx})

    words = ["stream_lo", "stream_hi"]
    for dt in ("fp32", "bf16") if FULL else ("fp32",):
        build(f"philox_fill_/{dt}", P._philox_fill_kernel,
              {"out_ptr": f"*{dt}", "n": "i32", "offset": "i64",
               **dict.fromkeys([*words, "seed_lo", "seed_hi"], "i32")},
              {"DIST": 0, "BLOCK": 1024}, ["out_ptr"], **P.NOISE_LAUNCH)
    for dt, n_terms in ([("fp32", 2), ("fp32", 6), ("bf16", 2), ("fp64", 2)] if FULL else [("fp32", 2)]):
        terms = {}
        for j in range(4):
            terms.update({f"seed{j}_lo": "i32", f"seed{j}_hi": "i32", f"a{j}": "fp32"})
        build(f"zo_perturb_/{dt}/{n_terms} terms", Z._zo_perturb_kernel,
              {"p_ptr": f"*{dt}", "n": "i32", "offset": "i64", **dict.fromkeys(words, "i32"), **terms,
               "extra_ptr": "*i32", "c": "fp32", "c64_lo": "i32", "c64_hi": "i32"},
              {"N_TERMS": n_terms, "DIST": 0, "BLOCK": 1024}, ["p_ptr", "extra_ptr"], **Z.NOISE_LAUNCH)

    # G (B, T, out) and X (B, T, in) contiguous: unit strides are constants in a real launch
    norms_types = {"g_ptr": None, "x_ptr": None, "out_ptr": "*fp32", "T": "i32", "D_OUT": "i32", "D_IN": "i32",
                   "stride_gb": "i32", "stride_gt": "i32", "stride_xb": "i32", "stride_xt": "i32", "SLOTS": "i32"}
    norms_aligned = ["g_ptr", "x_ptr", "out_ptr", "D_OUT", "D_IN", "stride_gb", "stride_gt", "stride_xb", "stride_xt"]
    acc_types = {"g_ptr": None, "x_ptr": None, "coef_ptr": "*fp32", "w_ptr": "*fp32", "T": "i32", "N_ROWS": "i32",
                 "D_OUT": "i32", "D_IN": "i32", "stride_gr": "i32", "stride_xr": "i32", "stride_wo": "i32"}
    acc_aligned = ["g_ptr", "x_ptr", "coef_ptr", "w_ptr", "D_OUT", "D_IN", "stride_gr", "stride_xr", "stride_wo"]
    for dt, direct_tiles, acc_tiles in (("fp32", N._DIRECT_FP32, A._TILES_FP32),
                                        ("bf16", N._DIRECT_16BIT, A._TILES_16BIT)):
        io = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}"}
        for o, i, t, w, s in direct_tiles if FULL else direct_tiles[:1]:
            build(f"dp_linear_norms direct/{dt}/{o}x{i}x{t} w{w} s{s}", N._dp_linear_norms_direct_kernel,
                  {**norms_types, **io}, {"stride_go": 1, "stride_xi": 1, "BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t},
                  norms_aligned, num_warps=w, num_stages=s, enable_fp_fusion=True)
        if FULL:
            ghost = dict(N._CUDA_GHOST)
            w, s = ghost.pop("num_warps"), ghost.pop("num_stages")
            build(f"dp_linear_norms ghost/{dt}", N._dp_linear_norms_ghost_kernel, {**norms_types, **io},
                  {"stride_go": 1, "stride_xi": 1, **ghost}, norms_aligned, num_warps=w, num_stages=s,
                  enable_fp_fusion=True)
        for o, i, r, w, s in acc_tiles if FULL else acc_tiles[:1]:
            build(f"dp_clip_accumulate_/{dt}/{o}x{i}x{r} w{w} s{s}", A._dp_clip_accumulate_kernel,
                  {**acc_types, **io}, {"stride_go": 1, "stride_xi": 1, "stride_wi": 1,
                                        "BLOCK_O": o, "BLOCK_I": i, "BLOCK_R": r},
                  acc_aligned, num_warps=w, num_stages=s, enable_fp_fusion=True)
    print(json.dumps(results))
''')


def _compile(mode: str, tmp_path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, leave no cache behind
    proc = subprocess.run([sys.executable, "-c", COMPILE, mode], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(results: list[dict]) -> None:
    problems = []
    for r in results:
        name = r["name"]
        if name.startswith(("philox_fill_", "zo_perturb_")):
            if not (r["div_rn"] and r["sqrt_rn"]) or r["approx"]:
                problems.append(f"{name}: division/sqrt not correctly rounded ({r['approx'] or 'no div.rn/sqrt.rn'})")
            if r["fma"]:
                problems.append(f"{name}: FMA contraction (launch with enable_fp_fusion=False)")
        else:
            if "/fp32/" in name and r["tf32"]:
                problems.append(f"{name}: TF32 in an fp32 dot (input_precision must be 'ieee')")
            if "/bf16/" in name and not r["mma"]:
                problems.append(f"{name}: bf16 dot without tensor-core MMA")
            if r["shared"] > SM90_SHARED_BYTES:
                problems.append(f"{name}: {r['shared']} bytes of shared memory > {SM90_SHARED_BYTES}")
    assert not problems, "\n".join(problems)


def test_kernels_compile_for_sm90(tmp_path):
    """One tile per DP kernel, the noise kernels in fp32: a few seconds."""
    results = _compile("quick", tmp_path)
    assert len(results) == 6
    _check(results)


@pytest.mark.slow
def test_every_autotuned_tile_compiles_for_sm90(tmp_path):
    _check(_compile("full", tmp_path))
