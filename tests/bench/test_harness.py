"""The benchmark harness: the timing loop's order and quantiles, the command line, the git state."""

import re
import subprocess
import sys

import pytest

from memtrain.bench import _harness
from memtrain.bench._harness import command_line, git_state, interleave, interleaved, summarize


def test_interleave_runs_round_by_round():
    calls = []
    out = interleave({m: (lambda m=m: calls.append(m) or len(calls)) for m in "ABC"}, rounds=3)
    assert "".join(calls) == "ABCCBAABC"  # reversed every other round: no method always goes first
    assert out == {"A": [1, 6, 7], "B": [2, 5, 8], "C": [3, 4, 9]}
    with pytest.raises(ValueError, match="rounds"):
        interleave({"A": lambda: 0}, rounds=0)


def test_summarize_interpolates_percentiles():
    # sorted 0, 10, 20, 30, 40: the 20th percentile sits at rank 0.8 (8), the 80th at rank 3.2 (32)
    s = summarize([30.0, 0.0, 40.0, 10.0, 20.0])
    assert (s["p20"], s["median"], s["p80"]) == pytest.approx((8.0, 20.0, 32.0))
    assert s["rounds"] == 5 and s["samples"] == [30.0, 0.0, 40.0, 10.0, 20.0]
    assert summarize([2.5]) == {"median": 2.5, "p20": 2.5, "p80": 2.5, "rounds": 1, "samples": [2.5]}
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_interleaved_discards_the_warmup_rounds():
    calls = []
    stats = interleaved({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, rounds=2, warmup=1,
                        device="cpu")
    assert "".join(calls) == "ABBAAB"
    assert stats["A"]["rounds"] == stats["B"]["rounds"] == 2


@pytest.mark.parametrize("orig, expected", [
    (["/venv/bin/python3", "/venv/bin/memtrain-bench", "zo", "--model", "a b"], "memtrain-bench zo --model 'a b'"),
    (["/usr/bin/python3", "-m", "memtrain.bench", "dp", "--isolate"], "python -m memtrain.bench dp --isolate"),
    (["python", "-X", "dev", "-m", "memtrain.bench.kernels.bench_zo_perturb", "--numel", "8"],
     "python -m memtrain.bench.kernels.bench_zo_perturb --numel 8"),
])
def test_command_line_as_run(monkeypatch, orig, expected):
    monkeypatch.setattr(sys, "orig_argv", orig)
    assert command_line() == expected


def test_command_line_of_a_call():
    assert command_line(["plan", "--model", "opt-tiny"]) == "memtrain-bench plan --model opt-tiny"


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_gives_the_full_sha_and_the_dirty_flag(tmp_path):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    assert git_state(tmp_path) == (None, None)  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "a")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert git_state(tmp_path) == (sha, False)
    (tmp_path / "new.txt").write_text("untracked")
    assert git_state(tmp_path) == (sha, True)
    (tmp_path / "new.txt").unlink()
    (tmp_path / "a.txt").write_text("changed")
    assert git_state(tmp_path) == (sha, True)


def test_own_checkout_is_this_repository():
    root = _harness.own_checkout()
    if root is None:
        pytest.skip("memtrain.bench is not running from a checkout (installed from a wheel)")
    assert (root / "bench" / "_harness.py").samefile(_harness.__file__)
