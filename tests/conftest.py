"""Shared test set-up: Triton interpreter on CPU-only machines, seeding, GPU/nvcc capability checks.

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a function, so it is set here, before any
test module imports ``memtrain.kernels``, whenever no CUDA device is present.
"""

import os
import random
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip (not deselect) GPU tests without CUDA and nvcc tests without the compiler."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    has_nvcc = shutil.which("nvcc") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "nvcc" in item.keywords and not has_nvcc:
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
