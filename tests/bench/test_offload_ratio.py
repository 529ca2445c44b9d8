"""The offload comparison of a ``zo`` run: the ratio, the transfers alone and the share of them hidden."""

import json

import pytest

from memtrain.bench.cli import main
from memtrain.bench.offload_ratio import hidden_share, offload_comparisons
from memtrain.bench.report import print_offload
from zo2.offload import OffloadEngine

TRANSFERS_S = 0.5


def _zo(tmp_path, *extra):
    main(["zo", "--model", "opt-tiny", "--methods", "zo2,zo2-offload", "--rounds", "2", "--batch", "2", "--seq",
          "16", "--steps", "1", "--warmup", "1", "--no-plots", "--no-prime", "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / "results.json").read_text())


def test_hidden_share_formula():
    assert hidden_share(1.2, 1.0, 0.5) == pytest.approx(1 - 0.2 / 0.5)
    assert hidden_share(0.9, 1.0, 0.5) == 1.0  # an offloaded step faster than the plain one hides everything
    assert hidden_share(2.0, 1.0, 0.5) == pytest.approx(-1.0)  # slower than the transfers alone: not clamped
    with pytest.raises(ValueError, match="positive"):
        hidden_share(1.0, 1.0, 0.0)


def test_ratio_and_hidden_share_from_the_engine_transfer_time(tmp_path, monkeypatch):
    calls = []

    def time_transfers(self, rounds=1):
        calls.append(self)
        return TRANSFERS_S

    monkeypatch.setattr(OffloadEngine, "time_transfers", time_transfers, raising=False)
    record = _zo(tmp_path)
    res = {r["method"]: r for r in record["results"]}
    plain, off = res["zo2"], res["zo2-offload"]
    assert plain["status"] == off["status"] == "ok"
    assert len(calls) == 2  # once per round, after the offload method's steps
    assert off["transfers"]["status"] == "ok" and off["transfers"]["samples"] == [TRANSFERS_S] * 2
    (comp,) = record["comparisons"]
    assert (comp["method"], comp["baseline"]) == ("zo2-offload", "zo2")
    assert comp["ratio"] == pytest.approx(off["median"] / plain["median"])
    per_round = [a / b for a, b in zip(off["samples"], plain["samples"], strict=True)]
    assert sorted(comp["round_ratios"]["samples"]) == pytest.approx(sorted(per_round))
    # on the CPU the share means nothing (copies within host memory, inline with compute): n/a and why
    assert comp["hidden_share"] is None and "n/a on a CPU device" in comp["hidden_share_note"]
    (on_gpu,) = offload_comparisons(record["results"], device="cuda:0")  # the same records, as a GPU run's
    extra = max(off["median"] - plain["median"], 0.0)
    assert on_gpu["hidden_share"] == pytest.approx(1 - extra / TRANSFERS_S)


def test_the_printed_table_says_n_a_on_cpu(capsys):
    record = {"model": "m", "method": "zo2-offload", "status": "ok", "median": 2.0, "samples": [2.0, 2.0],
              "transfers": {"status": "ok", "median": 0.01}}
    plain = {**record, "method": "zo2", "median": 1.0, "samples": [1.0, 1.0]}
    print_offload(offload_comparisons([record, plain], device="cpu"))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["m", "zo2-offload"])
    assert row.split()[-1] == "n/a"  # not the -9900.0% that (2 - 1) / 0.01 would print
