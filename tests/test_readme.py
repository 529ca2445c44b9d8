"""The README's and the docs' python code blocks run as a reader pastes them.

A block that is not meant to run (a fragment, or one that needs a GPU, a checkpoint or torchrun) is marked by
the line ``<!-- not-run: reason -->`` right before its opening fence; every other ``python`` block runs in a
fresh interpreter, in an empty directory (so the checkout is not on ``sys.path``), and must exit 0.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not-run: (\S.*?) -->\s*$")


def python_blocks(markdown: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, the not-run reason or None) for each python block."""
    blocks = []
    for match in FENCE.finditer(markdown):
        before = markdown[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        line = markdown.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), marker.group(1) if marker else None))
    return blocks


def runnable(path: pathlib.Path) -> list:
    return [pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
            for line, code, reason in python_blocks(path.read_text()) if reason is None]


def run_block(code: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)


def test_marker_parsing():
    text = ("<!-- not-run: needs a GPU -->\n```python\nimport a\n```\n\n```python\nprint(1)\n```\n"
            "<!-- not-run:  -->\n```python\nx\n```\n")
    assert python_blocks(text) == [(2, "import a\n", "needs a GPU"), (6, "print(1)\n", None), (10, "x\n", None)]


def test_readme_has_the_two_quickstarts_unmarked():
    blocks = python_blocks((ROOT / "README.md").read_text())
    codes = [code for _, code, reason in blocks if reason is None]
    assert len(codes) == 2 and "zo2.ZOSGD" in codes[0] and "flashdp.PrivacyAccountant" in codes[1]


@pytest.mark.parametrize("code", runnable(ROOT / "README.md"))
def test_readme_block_runs(code, tmp_path):
    proc = run_block(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # what the reader is told to expect: the loss each few steps, ε per epoch; and no warning on the way
    assert re.search(r"step \d+: loss \d|ε = \d", proc.stdout), proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.parametrize("code", [p for doc in sorted((ROOT / "docs").glob("*.md")) for p in runnable(doc)])
def test_docs_block_runs(code, tmp_path):
    proc = run_block(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
