"""Planned memory against model size, one line per method, from a ``memtrain-bench plan`` JSON.

    python -m memtrain.bench.plot_plan bench/results/plan-memory-opt/results.json --out docs/img/memory_vs_size.png

Device memory is solid; for offload rows the host memory they also need is dashed (same colour). The figures are
the planner's (docs/memory_plan.md), not measurements: the plan is held to measured peaks by the test suite.
"""

from __future__ import annotations

import argparse
import json
import pathlib

GiB = 2**30


def plot(plans: list[dict], out: pathlib.Path, title: str) -> pathlib.Path:
    """Draw device (and host, for offload rows) GiB against parameters, log-log; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p["method"] for p in plans))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        rows = sorted((p for p in plans if p["method"] == method), key=lambda p: p["n_params"])
        colour = f"C{i}"
        ax.plot([p["n_params"] for p in rows], [p["total_bytes"] / GiB for p in rows], marker="o", color=colour,
                label=f"{method}: device")
        if any(p.get("host_bytes") for p in rows):
            ax.plot([p["n_params"] for p in rows], [p["host_bytes"]["total"] / GiB for p in rows], marker="s",
                    linestyle="--", color=colour, label=f"{method}: host")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("planned memory, GiB")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("plan_json", help="results.json written by memtrain-bench plan")
    ap.add_argument("--out", default="memory_vs_size.png", help="PNG to write")
    args = ap.parse_args(argv)
    record = json.loads(pathlib.Path(args.plan_json).read_text())
    cfg = record.get("config", {})
    title = f"planned peak memory per method, B={cfg.get('batch')}, T={cfg.get('seq')}"
    print(plot(record["plans"], pathlib.Path(args.out), title))


if __name__ == "__main__":
    main()
