"""The DP comparison of a ``dp`` run: each private method's throughput and peak memory against non-DP.

When a run holds ``nondp`` and a DP method of the same model, both interleaved round by round, the
report gives

- ``throughput_ratio``: median non-DP step / median DP step (the same tokens per step, so the ratio of
  tokens/s), and ``round_ratios``: the same ratio round by round (the two steps of a round saw the same
  load), summarised with its p20–p80 spread: the figure a throughput target is judged on;
- ``memory_ratio``: the DP method's in-process peak over non-DP's (both over the pre-build baseline),
  and ``isolated_memory_ratio``: the same from each method's own fresh process (``--isolate``), when
  both isolated records are ok;
- ``op_profile`` (``--profile-ops``): the DP method's flashdp regions as shares of the profiled non-DP step,
  and the ops whose time differs most (:func:`memtrain.bench.op_profile.compare_profiles`).
"""

from __future__ import annotations

from ._harness import round_ratios
from .op_profile import compare_profiles

BASELINE = "nondp"


def _isolated_peak(rec: dict) -> int | None:
    iso = rec.get("isolated") or {}
    return iso.get("peak_bytes") if iso.get("status") == "ok" else None


def dp_comparisons(results: list[dict]) -> list[dict]:
    """One comparison per (model, DP method) of ``results`` whose ``nondp`` record is ok as well."""
    ok = {(r.get("model"), r["method"]): r for r in results if r.get("status") == "ok"}
    out = []
    for (model, method), dp in ok.items():
        base = ok.get((model, BASELINE))
        if method == BASELINE or base is None:
            continue
        comp = {"model": model, "method": method, "baseline": BASELINE,
                "throughput_ratio": base["median"] / dp["median"],
                "round_ratios": round_ratios(base["samples"], dp["samples"]),
                "memory_ratio": dp["memory_bytes"]["peak"] / base["memory_bytes"]["peak"],
                "isolated_memory_ratio": None}
        if "op_profile" in dp and "op_profile" in base:
            comp["op_profile"] = compare_profiles(dp["op_profile"], base["op_profile"])
        iso_dp, iso_base = _isolated_peak(dp), _isolated_peak(base)
        if iso_dp is not None and iso_base is not None:
            comp["isolated_memory_ratio"] = iso_dp / iso_base
        out.append(comp)
    return out
