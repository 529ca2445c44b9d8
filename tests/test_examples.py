"""The examples run end to end with tiny settings (a subprocess each, as a user would start them)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, tmp_path: pathlib.Path) -> str:
    script = EXAMPLES / name
    if not script.exists():
        pytest.skip(f"{script} is not in this checkout")
    proc = subprocess.run([sys.executable, str(script), *args, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_zo_opt_classification_example(tmp_path):
    out = run_example("zo_opt_classification.py", "--steps", "3", "--pretrain-steps", "3", "--hidden", "16",
                      "--train-size", "32", "--batch-size", "4", tmp_path=tmp_path)
    assert "accuracy before" in out and "accuracy after 3 ZO steps" in out


def test_dp_llama_finetune_example(tmp_path):
    out = run_example("dp_llama_finetune.py", "--epochs", "1", "--hidden", "16", "--train-size", "64",
                      "--batch-size", "16", tmp_path=tmp_path)
    assert "perplexity after" in out and "privacy spent: epsilon=" in out
