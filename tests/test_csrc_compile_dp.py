"""csrc/dp_*.cu compile with nvcc (-c and -ptx); no GPU needed."""

import pathlib
import shutil
import subprocess

import pytest

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


def test_sources_exist():
    assert SOURCES, "expected csrc/dp_clip.cu"
