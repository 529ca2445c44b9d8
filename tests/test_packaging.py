"""Packaging: import names, public surface, lean imports, the compiled extension, the env report."""

import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_package_from_this_checkout():
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        assert not pathlib.Path(spec.origin).resolve().is_relative_to(REPO), spec.origin
    kernels = importlib.import_module("memtrain.kernels")
    assert kernels.__name__ == "memtrain.kernels"


@pytest.mark.parametrize("package", ["memtrain", "memtrain.kernels", "zo2", "flashdp"])
def test_all_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ lists {name!r}, which does not exist"


def test_import_is_lean(tmp_path):
    """Importing the front-ends and kernels initialises no CUDA context and compiles nothing."""
    code = (
        "import torch, memtrain, zo2, memtrain.kernels.zo_perturb, memtrain.kernels.philox\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # cwd: keep the checkout off sys.path


def test_cpp_extension_is_built():
    """CI must exercise the C++ kernels, not silently the fallback (unless the build was switched off)."""
    from memtrain._cpp import cpp_available, cpp_error

    if os.environ.get("MEMTRAIN_BUILD_EXT") == "0":
        pytest.skip("MEMTRAIN_BUILD_EXT=0")
    assert cpp_available(), f"memtrain._C failed to import: {cpp_error()!r}"


def test_require_cpp_names_the_fix(monkeypatch):
    import memtrain._cpp as cpp

    monkeypatch.setattr(cpp, "_load", lambda: (None, ImportError("no _C")))
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        cpp.require_cpp()


def test_env_report_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "memtrain.env_report"], check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout
    for field in ("torch", "triton", "C++ extension", "zo_perturb_ backend"):
        assert field in out


def test_cpu_use_survives_a_broken_triton(tmp_path):
    """A Triton that fails to import never breaks CPU use."""
    code = (
        "import sys; sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import torch, zo2\n"
        "from memtrain.kernels import philox, zo_perturb\n"
        "assert not philox.HAS_TRITON\n"
        "p = torch.nn.Parameter(torch.randn(10))\n"
        "opt = zo2.ZOSGD([p], lr=1e-2)\n"
        "opt.step(lambda: (p ** 2).sum())\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    assert out.strip() == "ok"


def test_demo_runs_and_lowers_the_loss(capsys):
    from memtrain.demo import run

    result = run(["--steps", "40", "--warmup-steps", "20", "--eval-every", "20", "--hidden", "32"])
    out = capsys.readouterr().out
    assert "held-out loss" in out and "peak RSS" in out
    # each figure says what it is: the median over which steps, and whose memory the peak RSS counts
    assert "median of the last 20 steps" in out and "before the model was built" in out
    assert "MB the model's parameters" in out
    assert len(result["history"]) == 2
    assert result["end_loss"] < result["start_loss"]


def test_demo_console_script_exits_zero(tmp_path):
    """The README's main job: `memtrain-demo` is installed and exits 0 (a returned value would be its exit code)."""
    script = shutil.which("memtrain-demo") or str(pathlib.Path(sys.executable).with_name("memtrain-demo"))
    done = subprocess.run([script, "--steps", "4", "--warmup-steps", "2", "--eval-every", "2", "--hidden", "16"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "held-out loss" in done.stdout
