"""``python -m memtrain.env_report``: the facts a bug report starts with.

Versions of Python, torch, triton and transformers; CUDA and the device; whether the C++ extension
loaded (and why not); which backend each kernel uses for CPU and CUDA tensors; which path flashdp's
dispatcher takes for a DP linear layer on each device (per layer at run time: DEBUG log of the
``"flashdp"`` logger).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, str]:
    """The environment as ordered (name, value) pairs."""
    import torch

    import memtrain
    from memtrain._cpp import cpp_available, cpp_error
    from memtrain.kernels.philox import HAS_TRITON

    cuda = torch.cuda.is_available()
    info = {
        "memtrain": memtrain.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton") + ("" if HAS_TRITON else " (not importable)"),
        "transformers": _version("transformers"),
        "opacus": _version("opacus"),
        "cpu threads": str(torch.get_num_threads()),
        "cuda available": str(cuda),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu only",
        "nvcc": shutil.which("nvcc") or "not found",
        "C++ extension": "loaded" if cpp_available() else f"NOT loaded ({cpp_error()!r})",
    }
    cpu_backend = "C++ (memtrain._C)" if cpp_available() else "torch fallback"
    gpu_backend = "Triton" if HAS_TRITON else "unavailable (install triton)"
    for op in ("philox_fill_", "zo_perturb_"):
        info[f"{op} backend"] = f"cpu: {cpu_backend}; cuda: {gpu_backend}"
    info.update(_flashdp_dispatch())
    return info


def _flashdp_dispatch() -> dict[str, str]:
    """flashdp's dispatch rule per device (flashdp.dispatch.describe_rules), or why it is unavailable."""
    try:
        from flashdp.dispatch import describe_rules
    except Exception as err:  # a broken flashdp must not hide the rest of the report
        return {"flashdp dispatch": f"unavailable ({err!r})"}
    return {f"flashdp dispatch ({device})": rule for device, rule in describe_rules().items()}


def main() -> None:
    info = report()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
