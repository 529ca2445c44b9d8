"""The run's plots, drawn from a committed results JSON on matplotlib's Agg backend.

What is drawn is read back from the figures and checked against the JSON's own numbers: each method's plan bar
is its terms stacked bottom to top (summing to the plan's total), the measured peak sits beside it, and the
throughput error bars span tokens per step (B·T from the run's config) over the p80 and the p20 step times.
"""

import json
import pathlib

import pytest

pytest.importorskip("matplotlib")

from matplotlib.patches import Rectangle

from memtrain.bench.report import MiB, make_plots, memory_figure, throughput_figure

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "zo-offload-opt-125m" / "results.json"
# matplotlib keeps bar geometry in float64: a bar's bottom is the sum of the terms below it, rounded once per term
# (a few terms: a few ulps), and its height the term in MiB
REL = 1e-12


@pytest.fixture
def record():
    return json.loads(RESULTS.read_text())


def _second_model(record: dict) -> list[dict]:
    """The record's results plus a copy of them under another model name, a larger size and other timings."""
    extra = []
    for r in record["results"]:
        r2 = {**r, "model": "opt-350m", "n_params": 3 * r["n_params"]}
        r2.update(median=2 * r["median"], p20=1.5 * r["median"], p80=3 * r["median"])
        r2["tokens_per_s"] = r["tokens_per_s"] / 2  # the same tokens per step in twice the time
        extra.append(r2)
    return record["results"] + extra


def test_make_plots_writes_pngs_on_agg(record, tmp_path):
    import matplotlib

    paths = make_plots(record["results"], tmp_path, "process RSS")
    assert matplotlib.get_backend().lower() == "agg"
    # one model size: no peak-against-size plot (a single point says nothing)
    assert sorted(pathlib.Path(p).name for p in paths) == ["memory_by_term.png", "throughput.png"]
    for p in paths:
        assert pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = make_plots(_second_model(record), tmp_path, "process RSS")
    assert "peak_memory.png" in {pathlib.Path(p).name for p in paths}


def test_memory_bars_stack_the_plan_terms_beside_the_measured_peak(record):
    results = _second_model(record)
    fig = memory_figure(results, "process RSS")
    models = list(dict.fromkeys(r["model"] for r in results))
    assert len(fig.axes) == len(models)  # one panel per model
    for ax, model in zip(fig.axes, models, strict=True):
        rows = [r for r in results if r["model"] == model and r["status"] == "ok"]
        assert [t.get_text() for t in ax.get_xticklabels()] == [r["method"] for r in rows]
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        markers = [line for line in ax.lines if line.get_marker() == "D"]
        assert len(markers) == len(rows)
        for x, r in enumerate(rows):
            terms = list(r["plan"]["components_bytes"].values())
            mine = sorted((b for b in bars if abs(b.get_x() + b.get_width() / 2 - x) < 0.5), key=lambda b: b.get_y())
            assert len(mine) == len(terms), (model, r["method"])
            top = 0.0  # bottom to top in the plan's order, each bar starting where the one below ends
            for bar, v in zip(mine, terms, strict=True):
                assert bar.get_y() == pytest.approx(top, rel=REL)
                assert bar.get_height() == pytest.approx(v / MiB, rel=REL)
                top = bar.get_y() + bar.get_height()
            assert top == pytest.approx(r["plan"]["total_bytes"] / MiB, rel=REL)
            (marker,) = [m for m in markers if abs(m.get_xdata()[0] - x) < 0.5]
            assert marker.get_xdata()[0] > max(b.get_x() + b.get_width() for b in mine)  # beside the bar
            assert marker.get_ydata()[0] == pytest.approx(r["memory_bytes"]["peak"] / MiB, rel=REL)


def test_throughput_error_bars_span_p20_to_p80(record):
    results = _second_model(record)
    tokens = record["config"]["batch"] * record["config"]["seq"]
    fig = throughput_figure(results)
    (ax,) = fig.axes
    models = list(dict.fromkeys(r["model"] for r in results))
    containers = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert [c.get_label() for c in containers] == models
    for container, model in zip(containers, models, strict=True):
        rows = [r for r in results if r["model"] == model and r["status"] == "ok"]
        segments = container.errorbar.lines[2][0].get_segments()
        assert len(segments) == len(container.patches) == len(rows)
        for bar, seg, r in zip(container.patches, segments, rows, strict=True):
            assert bar.get_height() == pytest.approx(tokens / r["median"], rel=1e-9)
            (x0, low), (x1, high) = seg
            assert x0 == x1 == pytest.approx(bar.get_x() + bar.get_width() / 2)
            assert low == pytest.approx(tokens / r["p80"], rel=1e-9)  # the slow rounds: fewest tokens/s
            assert high == pytest.approx(tokens / r["p20"], rel=1e-9)
            assert low <= bar.get_height() <= high
