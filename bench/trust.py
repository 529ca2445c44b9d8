"""When a measurement cannot be trusted, say so: machine load, too few rounds, ratios within their own spread.

A benchmark on a shared machine silently reports whatever the load made of it. Every JSON record carries the
load average and the torch thread count (``env``) and the warnings below (``warnings``); the printed tables
show a ratio whose round-by-round p20–p80 spread is wider than its distance from 1 with that spread beside it
(as ``≈1`` when the spread contains 1), never as a bare figure.
"""

from __future__ import annotations

import os

MIN_ROUNDS = 7  # rounds a comparison needs before its ratio means anything (bench/RESULTS.md's rule)


def load_state(cores: int | None) -> dict:
    """``load_average`` (1, 5, 15 minutes; None where the OS has none) and ``free_cores`` = cores − 1-minute load."""
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        return {"load_average": None, "free_cores": None}
    return {"load_average": load, "free_cores": None if cores is None else cores - load[0]}


def trust_warnings(env: dict, rounds: int | None = None) -> list[str]:
    """What makes this run's figures doubtful: fewer free cores than torch threads; a comparison over fewer
    than MIN_ROUNDS rounds (``rounds``: None when the command compares nothing)."""
    found = []
    free, threads = env.get("free_cores"), env.get("torch_threads")
    if free is not None and threads is not None and free < threads:
        found.append(f"the machine is loaded: {free:.1f} free cores (cores {env.get('cpu_cores')} - load average "
                     f"{env['load_average'][0]:.2f}) for {threads} torch threads; timings are not comparable to a "
                     "quiet machine's (lower torch threads, or rerun when it is idle)")
    if rounds is not None and rounds < MIN_ROUNDS:
        found.append(f"--rounds {rounds} < {MIN_ROUNDS}: the ratios' p20-p80 spread is not estimated well enough "
                     f"to compare methods; use --rounds {MIN_ROUNDS} or more")
    return found


def ratio_text(value: float, round_ratios: dict | None) -> str:
    """``value`` to 3 decimals when its round-by-round p20–p80 spread is narrower than its distance from 1;
    otherwise the spread is printed beside it: ``≈1 (p20-p80 lo-hi)`` when the spread contains 1 (no difference
    established), ``value (p20-p80 lo-hi)`` when it lies wholly on one side of 1 (a difference, of uncertain
    size). ``n/s`` (no spread) when the rounds did not pair up."""
    if round_ratios is None:
        return f"{value:.3f} n/s"
    lo, hi = round_ratios["p20"], round_ratios["p80"]
    if hi - lo <= abs(value - 1.0):
        return f"{value:.3f}"
    if lo <= 1.0 <= hi:
        return f"≈1 (p20-p80 {lo:.3f}-{hi:.3f})"
    return f"{value:.3f} (p20-p80 {lo:.3f}-{hi:.3f})"
