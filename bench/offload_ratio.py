"""The offload comparison of a ``zo`` run: offloaded step / plain ZOSGD step, and the transfer time hidden.

When a run holds ``zo2`` and an offload method, both interleaved round by round, the report gives

- ``ratio``: median offloaded step / median plain step, and ``round_ratios``: the same ratio round by
  round (the two steps of a round saw the same load), summarised;
- ``hidden_share``: the share of the transfer time that does not show up in the step,
  ``1 - max(offloaded - plain, 0) / transfers``, where ``transfers`` is the median time of one step's
  uploads and offloads of every block with no compute (``engine.time_transfers()``). None, with the
  reason, when the engine cannot time its transfers, and on a CPU device: there the "transfers" are
  copies within host memory that run inline with the compute, nothing can overlap them, and the
  share is a difference of two noisy step times divided by a small copy time (a run printed -1043.6%).
"""

from __future__ import annotations

from ._harness import round_ratios

PLAIN = "zo2"
OFFLOAD = ("zo2-offload", "zo2-offload-amp")


def hidden_share(offloaded_s: float, plain_s: float, transfers_s: float) -> float:
    """Share of the transfer time hidden behind compute: 1 - (offloaded - plain) / transfers alone."""
    if transfers_s <= 0:
        raise ValueError(f"hidden_share: the transfer time must be positive, got {transfers_s}")
    return 1.0 - max(offloaded_s - plain_s, 0.0) / transfers_s


CPU_NOTE = ("hidden: n/a on a CPU device (blocks are copied within host memory, inline with the compute: no "
            "bus transfer to hide; the share is a GPU figure)")


def offload_comparisons(results: list[dict], device: str = "cuda") -> list[dict]:
    """One comparison per (model, offload method) of ``results`` whose plain ``zo2`` record is ok as well;
    ``device`` is the run's (no hidden share off CUDA)."""
    out = []
    ok = {(r.get("model"), r["method"]): r for r in results if r.get("status") == "ok"}
    for (model, method), off in ok.items():
        plain = ok.get((model, PLAIN))
        if method not in OFFLOAD or plain is None:
            continue
        comp = {"model": model, "method": method, "baseline": PLAIN, "ratio": off["median"] / plain["median"],
                "round_ratios": round_ratios(off["samples"], plain["samples"])}
        transfers = off.get("transfers") or {"status": "unavailable", "error": "no transfer timing in this record"}
        comp["transfers"] = transfers
        if not str(device).startswith("cuda"):
            comp["hidden_share"], comp["hidden_share_note"] = None, CPU_NOTE
        elif transfers.get("status") == "ok":
            comp["hidden_share"] = hidden_share(off["median"], plain["median"], transfers["median"])
        else:
            comp["hidden_share"], comp["hidden_share_note"] = None, transfers.get("error")
        out.append(comp)
    return out
