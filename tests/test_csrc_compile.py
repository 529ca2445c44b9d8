"""csrc/philox.h compiles in CUDA device code with nvcc (no GPU or driver needed); the .cu kernels have
their own compile tests (tests/test_csrc_compile_dp.py)."""

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

DEVICE_PROBE = r"""
#include "philox.h"
// The shared noise definition used from a CUDA kernel: one thread per Philox counter.
__global__ void fill_noise(float* out, unsigned long long seed, unsigned long long stream, long long n4) {
  long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (k >= n4) return;
  float z0, z1, z2, z3;
  memtrain::philox::noise4(seed, stream, (unsigned long long)k, memtrain::philox::kNormal, z0, z1, z2, z3);
  out[4 * k] = z0; out[4 * k + 1] = z1; out[4 * k + 2] = z2; out[4 * k + 3] = z3;
}
"""


def nvcc(source: pathlib.Path, out: pathlib.Path) -> None:
    cmd = [shutil.which("nvcc"), "-std=c++17", "-O2", "-arch=sm_90", f"-I{CSRC}", "-c", str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.nvcc
def test_philox_header_compiles_for_the_device(tmp_path):
    source = tmp_path / "probe.cu"
    source.write_text(DEVICE_PROBE)
    nvcc(source, tmp_path / "probe.o")
