"""bench/dp_epsilon.py: the measured multiplier of the 2-layer Llama (21 clip groups) brackets the σ given."""

import pytest

from memtrain.bench import dp_epsilon


def test_measured_multiplier_brackets_sigma_on_the_2_layer_llama():
    m = dp_epsilon.measured_multiplier(dp_epsilon.llama(hidden=32), sigma=1.2, steps=4)
    assert m["groups"] == 21
    assert m["c_total"] == pytest.approx(1.0, rel=1e-12)  # default thresholds: C_total = C
    assert m["noise_std"] == pytest.approx(1.2, rel=1e-12)
    lo, hi = m["interval"]  # exact chi-square interval at 1 − 1e-6: fails with that probability at most
    assert lo <= 1.2 <= hi and hi - lo < 0.5  # σ/√21 ≈ 0.26 (per-group σ·C_l) lies far outside
