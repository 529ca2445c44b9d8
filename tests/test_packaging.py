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
    root_on_path = any(pathlib.Path(p or os.getcwd()).resolve() == REPO for p in sys.path)
    if spec is not None and spec.origin and not root_on_path:  # from the root, the folder's shim is found
        assert not pathlib.Path(spec.origin).resolve().is_relative_to(REPO / "kernels"), spec.origin
    kernels = importlib.import_module("memtrain.kernels")
    assert kernels.__name__ == "memtrain.kernels"


def _from_root(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` with the checkout's root as the working directory (so first on ``sys.path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_from_the_root_kernels_is_hugging_faces_and_transformers_imports():
    """The root's ``kernels/`` folder must not shadow Hugging Face's ``kernels``, which transformers imports."""
    code = ("import os, kernels, memtrain.kernels\n"
            "from transformers import OPTForCausalLM\n"
            "print(os.path.realpath(kernels.__file__))\n"
            "print(os.path.realpath(memtrain.kernels.__file__))\n")
    out = _from_root("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    top, ours = out.stdout.split()
    assert not pathlib.Path(top).is_relative_to(REPO / "kernels"), f"`import kernels` from the root gave {top}"
    assert ours == str(REPO / "kernels" / "__init__.py")
    hidden = _from_root("-c", "import kernels.philox")  # none of the folder's modules under that name
    assert hidden.returncode != 0 and "No module named 'kernels.philox'" in hidden.stderr, hidden.stderr[-2000:]


def test_from_the_root_without_hugging_faces_kernels_the_import_fails_cleanly():
    code = ("import sys\n"
            "sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError as e:\n"
            "    assert e.name == 'kernels' and 'memtrain.kernels' in str(e), e\n"
            "    assert 'kernels' not in sys.modules\n"
            "else:\n"
            "    raise SystemExit(f'imported {kernels.__file__}')\n")
    out = _from_root("-c", code)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


# tests/zo2/conftest.py imports transformers, which imports `kernels`
@pytest.mark.parametrize("args", [("-m", "pytest", "--collect-only", "-q", "tests/test_packaging.py",
                                   "tests/zo2/test_step_loss.py"),
                                  ("-m", "memtrain.bench", "--help")], ids=["pytest", "memtrain.bench"])
def test_python_dash_m_from_the_root(args):
    out = _from_root(*args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


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
