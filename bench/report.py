"""What a run prints and writes: the terminal table, the memory breakdown by owner and the plots."""

from __future__ import annotations

import pathlib

MiB = 2**20


def breakdown(record: dict, plan: dict | None) -> dict:
    """Measured memory by phase and by owner (increases over the baseline), beside the plan's parts.

    Owners that a measurement cannot separate (activations from noise within one step) come from the plan.
    """
    m = record["memory_bytes"]
    owners = {
        "resident modules": m["after_build"],
        "optimizer state": max(0, m["after_first_step"] - m["after_build"]),
        "activations and temporaries (step)": max(0, m["steady_step_peak"] - m["after_first_step"]),
    }
    if "offload_plan" in record:
        owners["offload ring"] = record["offload_plan"].get("ring_bytes")
    phases = {k: m[k] for k in ("build_peak", "first_step_peak", "steady_step_peak")}
    return {"phases_peak_bytes": phases, "owners_bytes": owners,
            "planned_owners_bytes": plan["components_bytes"] if plan else None}


def _fmt(v, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if v is None else format(v / scale, spec)


def print_results(title: str, results: list[dict]) -> None:
    """One row per (model, method): throughput, step time (median, p20, p80), measured and planned peak."""
    from ._harness import print_table

    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["model"], r["method"], r["status"], *["-"] * 7, r.get("error", "")[:90]])
            continue
        peak = r["memory_bytes"]["peak"]
        plan = (r.get("plan") or {}).get("total_bytes")
        err = r.get("plan_error")
        rows.append([r["model"], r["method"], "ok", _fmt(r["tokens_per_s"]), _fmt(r["median"], 1e-3),
                     _fmt(r["p20"], 1e-3), _fmt(r["p80"], 1e-3), _fmt(peak, MiB), _fmt(plan, MiB),
                     "-" if err is None else f"{100 * err:+.0f}%", r.get("memory_note", "")[:40]])
    print_table(title, ["model", "method", "status", "tokens/s", "median ms", "p20 ms", "p80 ms", "peak MiB",
                        "plan MiB", "plan err", "note"], rows)


def print_isolated(results: list[dict]) -> None:
    """--isolate: each method's peak in a process of its own, and what training added over its set-up."""
    from ._harness import print_table

    rows = []
    for r in results:
        iso = r.get("isolated")
        if iso is None:
            continue
        if iso["status"] != "ok":
            rows.append([r["model"], r["method"], iso["status"], "-", "-", "-", iso.get("error", "")[:90]])
            continue
        rows.append([r["model"], r["method"], "ok", _fmt(iso["peak_bytes"], MiB), _fmt(iso["after_setup_bytes"], MiB),
                     _fmt(iso["peak_bytes"] - iso["after_setup_bytes"], MiB), ""])
    if rows:
        kind = "GPU allocated" if results[0].get("memory_kind") == "cuda" else "process RSS"
        print_table(f"peak memory, one fresh process per method ({kind}, whole process)",
                    ["model", "method", "status", "peak MiB", "after set-up MiB", "training adds MiB", "note"], rows)


def print_offload(comparisons: list[dict]) -> None:
    """The offload comparison: offloaded / plain step, transfers alone, share of them hidden behind compute."""
    from ._harness import print_table
    from .trust import ratio_text

    rows = []
    for c in comparisons:
        t = c["transfers"]
        rr = c["round_ratios"]
        rows.append([c["model"], c["method"], ratio_text(c["ratio"], rr),
                     "-" if rr is None else f"{rr['p20']:.3f}-{rr['p80']:.3f}",
                     _fmt(t.get("median"), 1e-3) if t.get("status") == "ok" else t.get("status"),
                     ("n/a" if c.get("hidden_share_note") else "-") if c["hidden_share"] is None
                     else f"{100 * c['hidden_share']:.1f}%"])
    if rows:
        print_table("offload: offloaded step / plain zo2 step; transfer time hidden = 1 - (offloaded - plain) / "
                    "transfers alone", ["model", "method", "ratio", "round ratios p20-p80", "transfers ms",
                                        "hidden"], rows)
        for c in comparisons:
            if c.get("hidden_share_note"):
                print(f"  {c['method']}: {c['hidden_share_note']}")


def print_dp(comparisons: list[dict]) -> None:
    """The DP comparison: throughput and peak memory of each private method against non-DP."""
    from ._harness import print_table
    from .trust import ratio_text

    rows = []
    for c in comparisons:
        rr, iso = c["round_ratios"], c["isolated_memory_ratio"]
        rows.append([c["model"], c["method"], ratio_text(c["throughput_ratio"], rr),
                     "-" if rr is None else f"{rr['median']:.3f} ({rr['p20']:.3f}-{rr['p80']:.3f})",
                     f"{c['memory_ratio']:.3f}", "-" if iso is None else f"{iso:.3f}"])
    if rows:
        print_table("DP / non-DP: throughput = non-DP step / DP step; memory = DP peak / non-DP peak",
                    ["model", "method", "throughput", "round ratios median (p20-p80)", "memory",
                     "memory (isolated)"], rows)


def print_op_profiles(comparisons: list[dict]) -> None:
    """--profile-ops: flashdp's regions as shares of the non-DP step, and the ops that differ most (ms per step)."""
    from ._harness import print_table

    for c in comparisons:
        prof = c.get("op_profile")
        if prof is None:
            continue
        head = (f"{c['model']}, {c['method']} against {c['baseline']} under torch.profiler: profiled step "
                f"{prof['dp_step_ms']:.1f} ms against {prof['baseline_step_ms']:.1f} ms")
        rows = [[name, f"{r['ms']:.1f}", f"{100 * r['share_of_baseline_step']:.2f}%", f"{r['calls']:.0f}"]
                for name, r in sorted(prof["regions"].items(), key=lambda kv: -kv[1]["ms"])]
        print_table(f"{head}; flashdp regions (ms per step, share of the non-DP step)",
                    ["region", "ms", "share", "calls"], rows)
        rows = [[d["op"][:60], f"{d['baseline_ms']:.1f}", f"{d['dp_ms']:.1f}", f"{d['difference_ms']:+.1f}"]
                for d in prof["largest_differences"]]
        print_table(f"{head}; ops with the largest difference (self ms per step)",
                    ["op", c["baseline"], c["method"], "difference"], rows)


def _host_text(p: dict) -> str:
    """A plan's host memory, pinned / pageable (GiB), or '-' for a method that holds none beside the device."""
    host = p.get("host_bytes")
    if not host:
        return "-"
    return f"{host['total'] / 2**30:.2f} ({host['pinned'] / 2**30:.2f} / {host['pageable'] / 2**30:.2f})"


def print_plans(plans: list[dict]) -> None:
    """One line per (model, method): device peak, host memory (offload: pinned / pageable), the optimizer
    whose state is counted; then each part of the device peak on its own line (fits 120 columns)."""
    head = f"{'model':<12} {'method':<17} {'device GiB':>10}  {'host GiB (pinned / pageable)':<30} optimizer state"
    print("\nplanned peak memory (GiB): device (the process's on a CPU run) and, for offload, host beside it")
    print(head)
    print("-" * len(head))
    for p in plans:
        print(f"{p['model'][:12]:<12} {p['method'][:17]:<17} {p['total_bytes'] / 2**30:>10.2f}  "
              f"{_host_text(p):<30} {p.get('optimizer') or '-'}")
        for k, v in p["components_bytes"].items():
            if v:
                print(f"{'':<31}{v / 2**30:>10.2f}    {k[:75]}")


def print_breakdowns(title: str, plans: list[dict]) -> None:
    """Each plan's total and every line of its breakdown (GiB), one term per line; the optimizer whose state
    it counts, and the host memory beside the device's for offload."""
    print(f"\n{title}")
    for p in plans:
        print(f"\n{p['model']}, {p['method']}: {p['total_bytes'] / 2**30:.2f} GiB on the device"
              + (f"; optimizer {p['optimizer']}" if p.get("optimizer") else ""))
        for k, v in p["components_bytes"].items():
            print(f"  {v / 2**30:10.3f}  {k}")
        if p.get("host_bytes"):
            print(f"  host: {_host_text(p)} GiB (pinned / pageable)")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _need_pyplot():
    """matplotlib's pyplot on the Agg backend, or an error naming the fix."""
    plt = _pyplot()
    if plt is None:
        raise ModuleNotFoundError("the bench's plots need matplotlib: pip install 'memtrain[bench]'")
    return plt


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if r["status"] == "ok"]


def memory_figure(results: list[dict], memory_kind: str):
    """One panel per model: for each method a bar of the plan's terms stacked (MiB), and beside it the measured
    peak as a black diamond. Methods without a plan get the diamond alone."""
    plt = _need_pyplot()
    ok = _ok(results)
    models = list(dict.fromkeys(r["model"] for r in ok))
    terms = list(dict.fromkeys(t for r in ok for t in _plan_terms(r)))
    colours = {t: plt.get_cmap("tab20")(i % 20) for i, t in enumerate(terms)}
    fig, axes = plt.subplots(len(models), 1, figsize=(7, 1.5 + 3 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        rows = [r for r in ok if r["model"] == model]
        handles = {}
        for x, r in enumerate(rows):
            bottom = 0.0
            for term, v in _plan_terms(r).items():
                handles[term] = ax.bar(x - 0.17, v / MiB, 0.3, bottom=bottom, color=colours[term])
                bottom += v / MiB
            (handles["measured peak"],) = ax.plot([x + 0.17], [r["memory_bytes"]["peak"] / MiB], marker="D",
                                                  color="black", linestyle="none")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"MiB ({memory_kind})")
        ax.set_title(f"{model}: plan by term (bar) beside the measured peak", fontsize=9)
        ax.legend(handles.values(), handles.keys(), fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def _plan_terms(r: dict) -> dict[str, int]:
    """A record's planned peak by term (bytes), in the plan's order; empty without a plan."""
    return dict((r.get("plan") or {}).get("components_bytes") or {})


def throughput_figure(results: list[dict]):
    """Tokens/s per method (one bar per model and method) at the median step time, with error bars spanning the
    p20-p80 step times over the rounds (tokens per step / p80 to tokens per step / p20)."""
    plt = _need_pyplot()
    ok = _ok(results)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs, tps, low, high = [], [], [], []
        for j, m in enumerate(methods):
            r = next((r for r in ok if r["method"] == m and r["model"] == model), None)
            if r is None:
                continue
            tokens = r["tokens_per_s"] * r["median"]  # tokens per step
            xs.append(j + i * width)
            tps.append(r["tokens_per_s"])
            low.append(r["tokens_per_s"] - tokens / r["p80"])
            high.append(tokens / r["p20"] - r["tokens_per_s"])
        ax.bar(xs, tps, width, yerr=[low, high], capsize=3, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))], methods, rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel("tokens/s (median; bars: p20-p80 of the rounds)")
    ax.set_title("throughput per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_figure(results: list[dict], memory_kind: str):
    """Measured peak memory against model size, one line per method (log-log)."""
    plt = _need_pyplot()
    ok = _ok(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in ok):
        pts = sorted((r["n_params"], r["memory_bytes"]["peak"] / MiB) for r in ok if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"peak memory increase, MiB ({memory_kind})")
    ax.set_title("peak memory against model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def make_plots(results: list[dict], out: pathlib.Path, memory_kind: str) -> list[str]:
    """The run's plots, as PNGs in ``out``: each method's planned peak split by term beside its measured peak
    (``memory_by_term.png``, one panel per model), throughput with p20-p80 error bars (``throughput.png``) and,
    with models of several sizes, peak memory against model size (``peak_memory.png``). [] with a message
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (pip install 'memtrain[bench]')")
        return []
    ok = _ok(results)
    if not ok:
        return []
    figures = {"memory_by_term.png": memory_figure(ok, memory_kind), "throughput.png": throughput_figure(ok)}
    if len({r["n_params"] for r in ok}) > 1:
        figures["peak_memory.png"] = size_figure(ok, memory_kind)
    paths = []
    for name, fig in figures.items():
        paths.append(str(out / name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def plot_timeline(samples: list[dict], out: pathlib.Path) -> str | None:
    """The RSS timeline of a CPU run, one colour per method."""
    plt = _pyplot()
    if plt is None or not samples:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    methods = list(dict.fromkeys(s["phase"].split(":")[0] for s in samples))
    for m in methods:
        pts = [(s["t_s"], s["rss_bytes"] / MiB) for s in samples if s["phase"].split(":")[0] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, label=m)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    path = out / "rss_timeline.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
