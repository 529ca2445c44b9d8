"""bench/compact_master.py: a tiny end-to-end run, and the verdict rule as documented."""

import json

import pytest

from memtrain.bench import compact_master

TINY = ["--vocab", "16", "--hidden", "32", "--layers", "1", "--seq-len", "8", "--batch", "2", "--successors", "2",
        "--pretrain-steps", "4", "--steps", "6", "--eval-every", "3", "--held-out", "4", "--seeds", "2"]


def test_tiny_run_writes_curves_and_a_verdict(tmp_path):
    out = tmp_path / "cm.json"
    record = compact_master.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text())["verdict"] == record["verdict"]
    runs = record["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("fp32", "compact", "bf16") for s in range(2))
    for r in runs:
        assert r["eval_steps"] == [0, 3, 6]
        assert r["held_out_loss"][0] == runs[0]["held_out_loss"][0]  # every run starts from the one checkpoint
    bytes_per_param = {r["variant"]: r["bytes_per_param"] for r in runs}
    assert bytes_per_param == {"fp32": 4.0, "compact": 4.0, "bf16": 2.0}  # compact: 2 B base + 2 B residual
    assert record["verdict"]["compact_ships"] in (True, False)


def run(variant: str, seed: int, curve: list[float]) -> dict:
    return {"variant": variant, "seed": seed, "held_out_loss": curve}


def test_verdict_is_the_mean_curve_inside_the_fp32_min_max_after_step_0():
    fp32 = [run("fp32", 0, [3.0, 2.0, 1.0]), run("fp32", 1, [3.0, 2.2, 1.4]), run("fp32", 2, [3.0, 2.1, 1.2])]
    inside = [run("compact", 0, [3.0, 2.0, 1.0]), run("compact", 1, [3.0, 2.3, 1.5])]  # means 2.15, 1.25: inside
    outside = [run("compact", 0, [3.0, 2.1, 1.3]), run("compact", 1, [3.0, 2.3, 1.6])]  # final mean 1.45 > 1.4
    steps = [0, 50, 100]
    assert compact_master.verdict(fp32 + inside, steps)["compact_ships"] is True
    v = compact_master.verdict(fp32 + outside, steps)
    assert v["compact_ships"] is False
    assert v["variants"]["compact"]["inside_at"] == 1 and v["variants"]["compact"]["evaluations"] == 2
    assert v["fp32_spread"] == {"min": [3.0, 2.0, 1.0], "max": [3.0, 2.2, 1.4]}
    assert v["variants"]["fp32"]["inside_everywhere"]  # the reference's own mean lies inside its min-max


def test_bad_variants_are_refused():
    with pytest.raises(SystemExit, match="need fp32"):
        compact_master.main([*TINY, "--variants", "compact,bf16"])
    with pytest.raises(SystemExit, match="need fp32"):
        compact_master.main([*TINY, "--variants", "fp32,fp8"])
