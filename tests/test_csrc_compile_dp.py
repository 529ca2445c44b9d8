"""csrc/dp_*.cu compile with nvcc (-c and -ptx), and the Python binding compiled with them at run time
(csrc/dp_clip_binding.cpp) compiles against torch's headers; no GPU needed."""

import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(CSRC.glob("dp_*.cu"))


@pytest.mark.nvcc
@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
@pytest.mark.parametrize("mode", ["-c", "-ptx"])
def test_nvcc_compiles(src, mode, tmp_path):
    nvcc = shutil.which("nvcc")
    out = tmp_path / (src.stem + (".o" if mode == "-c" else ".ptx"))
    proc = subprocess.run([nvcc, mode, "-arch=sm_80", "-O3", "-Werror=all-warnings", "-o", str(out), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    if mode == "-ptx":
        assert "dp_clip_once_kernel" in out.read_text()


@pytest.mark.nvcc
def test_binding_compiles_against_torch(tmp_path):
    """The C++ half of prepare()'s build. A CPU-only torch wheel ships the c10/cuda headers but not the
    build-generated cuda_cmake_macros.h, so a stand-in provides it."""
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *torch.utils.cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [shutil.which("nvcc"), "-std=c++20", "-x", "c++", "-Xcompiler", "-fsyntax-only", "-c",
           str(CSRC / "dp_clip_binding.cpp"), "-o", str(tmp_path / "binding.o"),
           *(f"-I{p}" for p in includes), "-DTORCH_EXTENSION_NAME=memtrain_dp_clip"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sources_exist():
    assert SOURCES, "expected csrc/dp_clip.cu"
    assert (CSRC / "dp_clip_binding.cpp").exists()
