"""``memtrain-bench dp-audit`` (flashdp and ``--optimizer dpzo``) end to end at a tiny setting, its option checks,
and the planted-bug self-test."""

import json

import pytest

from flashdp.optimizer import DPOptimizer
from memtrain.bench import dp_audit_planted
from memtrain.bench.cli import main
from zo2.dp_optimizer import DPZOSGD

TINY = ["--blocks", "1", "--width", "8", "--steps", "2", "--batch", "8", "--samples", "64", "--canaries", "20",
        "--guesses", "2"]


def test_dp_audit_prints_the_bound_beside_the_accountant_and_writes_json(tmp_path, capsys):
    main(["dp-audit", *TINY, "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results.json").read_text())
    out = capsys.readouterr().out
    audit = record["audit"]
    assert record["subcommand"] == "dp-audit" and record["planted_bug"] is None
    assert record["config"]["canaries"] == 20 and audit["canaries"] == 20 and audit["k_plus"] == audit["k_minus"] == 2
    assert audit["groups"] == 3 and audit["steps"] == 2 and 0 <= audit["correct"] <= audit["guesses"] == 4
    assert "ε lower bound" in out and "accountant ε" in out and f"{audit['accountant_epsilon']:.3f}" in out


@pytest.mark.parametrize("argv,message", [
    (["--canaries", "10", "--guesses", "6"], "--guesses must be in"), (["--noise-multiplier", "0"], "must be > 0"),
    (["--delta", "1"], "--delta must be in"), (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["dp-audit", *argv])
    assert message in capsys.readouterr().err


def test_the_planted_script_labels_its_record_and_restores_the_optimizer(tmp_path, capsys):
    orig = DPOptimizer.group_noise_std
    dp_audit_planted.main(["sqrtL", *TINY, "--out", str(tmp_path)])
    assert DPOptimizer.group_noise_std is orig
    assert json.loads((tmp_path / "results.json").read_text())["planted_bug"] == "sqrtL"
    assert "PLANTED BUG 'sqrtL'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="usage"):
        dp_audit_planted.main(["none"])


def test_dp_audit_of_dpzo_writes_its_record(tmp_path, capsys):
    argv = ["--optimizer", "dpzo", "--num-perturbations", "16", *TINY]  # 2 steps × 16 = 32 coordinates > 20 canaries
    main(["dp-audit", *argv, "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results.json").read_text())
    audit = record["audit"]
    assert record["config"]["optimizer"] == "dpzo" and record["planted_bug"] is None
    assert audit["num_perturbations"] == 16 and audit["clipping"] == "joint" and audit["released"] == 32
    assert audit["patterned"] == 32 and audit["canaries"] == 20 and 0 <= audit["correct"] <= audit["guesses"] == 4
    out = capsys.readouterr().out
    assert "zo2.DPZOSGD" in out and f"{audit['accountant_epsilon']:.3f}" in out


@pytest.mark.parametrize("argv,message", [
    (["--steps", "2", "--num-perturbations", "8", "--canaries", "20"], "need 21 orthogonal patterns"),
    (["--clipping", "aggregate", "--steps", "20", "--canaries", "20"], "need 21 orthogonal patterns"),
    (["--num-perturbations", "0"], "--num-perturbations must be >= 1"), (["--zo-eps", "0"], "--zo-eps must be > 0"),
])
def test_bad_dpzo_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["dp-audit", "--optimizer", "dpzo", *argv])
    assert message in capsys.readouterr().err


def test_the_dpzo_plant_labels_its_record_restores_dpzosgd_and_needs_its_optimizer(tmp_path, capsys):
    orig = DPZOSGD._noise
    dp_audit_planted.main(["noise-tenth", "--optimizer", "dpzo", "--num-perturbations", "16", *TINY,
                           "--out", str(tmp_path)])
    assert DPZOSGD._noise is orig
    assert json.loads((tmp_path / "results.json").read_text())["planted_bug"] == "noise-tenth"
    assert "PLANTED BUG 'noise-tenth'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pass --optimizer dpzo"):
        dp_audit_planted.main(["noise-tenth", *TINY])
    assert DPZOSGD._noise is orig
