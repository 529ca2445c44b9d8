"""The dp run's comparison against non-DP: throughput as the inverse step-time ratio, paired by round."""

import pytest

from memtrain.bench.dp_ratio import dp_comparisons


def _rec(method, samples, peak, iso_peak=None, model="m"):
    median = sorted(samples)[len(samples) // 2]
    rec = {"model": model, "method": method, "status": "ok", "median": median, "samples": samples,
           "memory_bytes": {"peak": peak}}
    if iso_peak is not None:
        rec["isolated"] = {"status": "ok", "peak_bytes": iso_peak}
    return rec


def test_throughput_is_baseline_step_over_dp_step_round_by_round():
    results = [_rec("nondp", [1.0, 2.0, 4.0], 100, iso_peak=1000),
               _rec("flashdp", [1.25, 2.0, 5.0], 110, iso_peak=1050)]
    (c,) = dp_comparisons(results)
    assert c["method"] == "flashdp" and c["baseline"] == "nondp"
    assert c["throughput_ratio"] == pytest.approx(2.0 / 2.0)
    # round by round: 1/1.25, 2/2, 4/5 -> median 0.8, the load of each round cancels in its ratio
    assert c["round_ratios"]["samples"] == pytest.approx([0.8, 1.0, 0.8])
    assert c["round_ratios"]["median"] == pytest.approx(0.8)
    assert c["memory_ratio"] == pytest.approx(1.1)
    assert c["isolated_memory_ratio"] == pytest.approx(1.05)


def test_no_pairs_after_a_failed_round_and_no_isolated_ratio_without_both_records():
    results = [_rec("nondp", [1.0, 2.0], 100), _rec("opacus", [3.0], 300, iso_peak=500),
               _rec("flashdp", [1.0], 90, model="other")]  # no baseline for this model
    (c,) = dp_comparisons(results)
    assert c["method"] == "opacus" and c["round_ratios"] is None and c["isolated_memory_ratio"] is None


def test_a_failed_method_is_not_compared():
    results = [_rec("nondp", [1.0], 100), {"model": "m", "method": "opacus", "status": "unavailable"}]
    assert dp_comparisons(results) == []
