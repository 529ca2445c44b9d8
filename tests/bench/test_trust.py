"""Benchmark output says when it cannot be trusted: load, rounds, ratios inside their own spread; and --help."""

import argparse
import os

import pytest

from memtrain.bench import cli
from memtrain.bench._harness import environment
from memtrain.bench.trust import load_state, ratio_text, trust_warnings


def test_ratio_within_its_spread_is_printed_with_it():
    # 0.931 with p20-p80 0.889-0.961: spread 0.072 > |0.931 - 1| = 0.069, wholly below 1: shown with its spread
    assert ratio_text(0.931, {"median": 0.931, "p20": 0.889, "p80": 0.961}) == "0.931 (p20-p80 0.889-0.961)"
    # 0.99 with 0.95-1.03: the spread contains 1, no difference is established
    assert ratio_text(0.99, {"median": 0.99, "p20": 0.95, "p80": 1.03}) == "≈1 (p20-p80 0.950-1.030)"
    # 1.17 with 1.104-1.249: spread 0.145 < 0.17, a figure on its own
    assert ratio_text(1.17, {"median": 1.17, "p20": 1.104, "p80": 1.249}) == "1.170"
    # 1.10 with 1.02-1.25: spread 0.23 > 0.10 but wholly above 1, so the spread is shown and ≈1 is not claimed
    assert ratio_text(1.10, {"median": 1.10, "p20": 1.02, "p80": 1.25}) == "1.100 (p20-p80 1.020-1.250)"
    # 0.454 with 0.415-0.491: spread 0.076 < 0.546
    assert ratio_text(0.454, {"median": 0.454, "p20": 0.415, "p80": 0.491}) == "0.454"
    assert ratio_text(5.0, None) == "5.000 n/s"  # rounds that did not pair up: no spread to judge by


def test_warnings_for_load_and_rounds():
    quiet = {"free_cores": 15.5, "torch_threads": 8, "cpu_cores": 16, "load_average": [0.5, 0.5, 0.5]}
    assert trust_warnings(quiet, rounds=7) == [] and trust_warnings(quiet) == []
    loaded = {**quiet, "free_cores": 2.0, "load_average": [14.0, 13.0, 11.0]}
    (load,) = trust_warnings(loaded)
    assert "2.0 free cores" in load and "8 torch threads" in load and "14.00" in load
    (rounds,) = trust_warnings(quiet, rounds=3)
    assert "--rounds 3 < 7" in rounds


def test_every_record_carries_load_and_threads():
    env = environment("cpu")
    assert env["load_average"] == pytest.approx(list(os.getloadavg()), abs=5.0)
    cores = env["cpu_cores"] or os.cpu_count()
    assert env["free_cores"] == pytest.approx(cores - env["load_average"][0])
    assert env["torch_threads"] >= 1
    assert load_state(4)["free_cores"] is not None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_and_option_has_help_with_defaults(monkeypatch, capsys):
    """Walk every subcommand's --help: a description, and a help text (with its default) for every option."""
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        seen["parser"] = self
        return real(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    subs = _subcommands(seen["parser"])
    assert set(subs) == {"zo", "dp", "plan", "kernels", "gpu-check", "dp-audit"}
    for name, parser in subs.items():
        assert parser.description, f"{name}: no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"memtrain-bench {name} {'/'.join(action.option_strings) or action.dest}: no help"
        with pytest.raises(SystemExit) as done:
            cli.parse_args([name, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        if name in ("zo", "dp"):
            assert "(default: 7)" in text and "(default: 1)" in text  # --rounds, --steps
