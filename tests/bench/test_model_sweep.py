"""memtrain-bench model-sweep: one architecture in-process (fast), the worker protocol, and the whole sweep (slow)."""

from __future__ import annotations

import pytest

from memtrain.bench import model_sweep as ms


def test_llama_row_is_exact_in_every_column():
    row = ms.run_one("llama")
    assert "skipped" not in row, row
    for col in ms.COLUMNS:
        assert row[col]["status"] == "exact", (col, row[col])
    assert row["flashdp"]["fallback"] == []  # every Llama module has a fused path


def test_gemma_flashdp_uses_the_fallback_for_its_norms_only():
    cell = ms.run_one("gemma", ["flashdp"])["flashdp"]
    assert cell["status"] == "exact", cell
    text = " ".join(cell["fallback"])
    assert "GemmaRMSNorm" in text and "Embedding" not in text  # the scaled embedding is fused


def test_tables_from_rows():
    rows = [{"model_type": "a", "class": "A", "params": 1,
             **{c: {"status": "exact", "err": 0.0, "err_grad": 0.0} for c in ms.COLUMNS}},
            {"model_type": "b", "class": "B", "params": 1, "zo2.ZOSGD": {"status": "exact", "err_grad": 0.0},
             "zo2.offload": {"status": "DIFFERS", "err_grad": 1.0, "tol_grad": 0.1, "err_params": 1.0},
             "flashdp": {"status": "refused", "message": "no"}},
            {"model_type": "c", "skipped": "cannot build tiny"}]
    doc = {"rows": rows, "transformers": "x"}
    doc["summary"] = ms.summary(rows)
    assert doc["summary"]["zo2.offload"] == {"built": 2, "exact": 1, "DIFFERS": 1, "refused_or_error": 0}
    assert doc["summary"]["flashdp"]["refused_or_error"] == 1
    short = ms.supported_models_markdown(doc)
    assert "| `zo2.offload` | 2 / 2 | 1 | 1 |" in short and "b (zo2.offload: DIFFERS)" in short
    full = ms.sweep_markdown(doc)
    assert "**DIFFERS**" in full and "- c: cannot build tiny" in full


def test_summary_of_a_partial_run_lists_only_the_columns_run():
    rows = [{"model_type": "a", "class": "A", "params": 1, "flashdp": {"status": "exact", "err": 0.0}}]
    doc = {"rows": rows, "transformers": "x", "summary": ms.summary(rows)}
    assert list(doc["summary"]) == ["flashdp"]
    assert "zo2" not in ms.supported_models_markdown(doc) and "zo2" not in ms.sweep_markdown(doc)


@pytest.mark.parametrize("model_type,fallback", [("mamba", "taken over"), ("blenderbot-small", "")])
def test_flashdp_children_read_directly_and_shared_positions_are_exact(model_type, fallback):
    """Mamba's mixer reads its children's weights (taken over by the fallback); Blenderbot's positions are one (T,)
    row for the batch (expanded per sample)."""
    cell = ms.run_one(model_type, ["flashdp"])["flashdp"]
    assert cell["status"] == "exact", cell
    assert fallback in " ".join(cell["fallback"])


@pytest.mark.slow
def test_sweep_records_a_failing_architecture_and_goes_on():
    """Each architecture runs in a worker process; one that fails is a row with its reason, the next still runs."""
    rows = ms.sweep(["not_a_model_type", "llama"], timeout=600, columns=["zo2.ZOSGD"])
    assert [r["model_type"] for r in rows] == ["not_a_model_type", "llama"]
    assert rows[1]["zo2.ZOSGD"]["status"] == "exact"
    assert "skipped" in rows[0] or "crashed" in rows[0]


@pytest.mark.slow
def test_every_causal_lm_no_silent_difference():
    """The whole sweep (tens of minutes on 2 cores): no column may silently differ from its reference, and the
    issue's acceptance targets hold (flashdp >= 95%, zo2.offload >= 97% of the architectures built)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = ms.sweep(list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), timeout=300)
    s = ms.summary(rows)
    assert all(c["DIFFERS"] == 0 for c in s.values()), ms.sweep_markdown({"rows": rows, "summary": s})
    built = s["flashdp"]["built"]
    assert s["flashdp"]["exact"] >= 0.95 * built and s["zo2.offload"]["exact"] >= 0.97 * built, s
