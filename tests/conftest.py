"""Shared test set-up: Triton interpreter on CPU-only machines, seeding, GPU/nvcc capability checks.

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a function, so it is set here, before any
test module imports ``memtrain.kernels``, whenever no CUDA device is present.
"""

import os
import random
import shutil
import socket
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


# ---------------------------------------------------------------- the test extra, checked at session start
def _unmet_requirements() -> list[str]:
    """memtrain's requirements and its ``test`` extra that are missing or outside their stated range."""
    from memtrain.requirements import unmet_requirements

    return unmet_requirements("test")


def pytest_sessionstart(session):
    """Refuse to run with part of the test extra missing: a missing package would otherwise drop its test
    modules (collection errors) or skip them, and the suite would look greener than it is."""
    unmet = _unmet_requirements()
    if unmet:
        pytest.exit(
            "the test suite needs memtrain's requirements and its `test` extra; unmet: " + "; ".join(unmet)
            + '. Install them with: pip install --no-build-isolation -e ".[test]"  (from the checkout, after '
            "torch; see README, Set-up)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_collection_modifyitems(config, items):
    """Skip (not deselect) GPU tests without CUDA and nvcc tests without the compiler."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    has_nvcc = shutil.which("nvcc") is not None
    # markers, not item.keywords: keywords also hold the names of the folders above the test (a checkout
    # in a folder named "gpu" would skip every test)
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("nvcc") is not None and not has_nvcc:
            item.add_marker(no_nvcc)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=_devices())
def device(request) -> str:
    return request.param


# Triton launchers read their tensors where the kernels run: on the GPU when there is one (compiled
# kernels), on the CPU under the interpreter otherwise (TRITON_INTERPRET=1, set above).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fp32_matmul_exact():
    """torch's fp32 matmuls (cuBLAS) in IEEE fp32 for the test, whatever the session set (no TF32)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def triton_device() -> str:
    """The device of the tensors a test passes to a ``_<op>_triton`` launcher (results come back with .cpu())."""
    return TRITON_DEVICE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def spawn_ranks(tmp_path):
    """Run a torch.distributed worker script as ``world`` processes and wait for all of them.

    Each process gets argv ``rank world port *args`` (the port is free on 127.0.0.1); a process that
    exits non-zero fails the test with the end of its stderr.
    """

    def spawn(script_text: str, world: int, *args: str) -> None:
        script = tmp_path / f"worker_{len(list(tmp_path.glob('worker_*.py')))}.py"
        script.write_text(script_text)
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), port, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]

    return spawn
