"""``--profile-ops N``: where a method's step time goes, per op and per flashdp region, from torch.profiler.

After a round's timed steps, ``N`` more steps run under ``torch.profiler.profile`` (untimed: the profiler
slows a step down, so these figures are shares, not throughput). Each op's self time and call count per step
are kept for the ops that take at least ``MIN_SHARE`` of the profiled step, and every flashdp region
(:mod:`flashdp.profiling`: norms, clipped sums, noise, ...) with its inclusive time. Over the rounds each
figure is summarised by its median and p20/p80 (an op absent from a round counts 0 there).

The DP comparison (:mod:`memtrain.bench.dp_ratio`) sets these beside non-DP's: each flashdp region as a
share of the non-DP step, and the ops whose time differs most between the two methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ._harness import summarize, synchronize

MIN_SHARE = 0.002  # ops under 0.2% of the profiled step are left out of the record
REGION_PREFIX = "flashdp."
TOP_DIFFERENCES = 15


def profile_steps(step: Callable[[], object], n: int, device: str) -> dict:
    """Run ``step`` ``n`` times under torch.profiler; per step: wall ms, and per op self ms and calls
    (``region`` ops: inclusive ms of a flashdp region)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.startswith("cuda")
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / n
    ops = {}
    for e in prof.key_averages():
        region = e.key.startswith(REGION_PREFIX)
        ms = (e.cpu_time_total if region else e.self_cpu_time_total) / 1e3 / n
        if not region and ms < MIN_SHARE * wall_ms:
            continue
        op = {"ms": ms, "calls": e.count / n, "region": region}
        if cuda:
            op["device_ms"] = (e.device_time_total if region else e.self_device_time_total) / 1e3 / n
        ops[e.key] = op
    return {"steps": n, "step_ms": wall_ms, "ops": ops}


def merge_profiles(profiles: list[dict]) -> dict:
    """One method's profiles over the rounds: the median (p20, p80) of each figure, 0 where a round lacks it."""
    names = list(dict.fromkeys(k for p in profiles for k in p["ops"]))
    ops = {}
    for name in names:
        present = [p["ops"][name] for p in profiles if name in p["ops"]]

        def over_rounds(key: str, name: str = name) -> dict:
            return summarize([p["ops"].get(name, {}).get(key, 0.0) for p in profiles])

        op = {"region": present[0]["region"], "ms": over_rounds("ms"), "calls": max(o["calls"] for o in present)}
        if "device_ms" in present[0]:
            op["device_ms"] = over_rounds("device_ms")
        ops[name] = op
    return {"steps": profiles[0]["steps"], "step_ms": summarize([p["step_ms"] for p in profiles]), "ops": ops}


def compare_profiles(dp: dict, base: dict) -> dict:
    """A DP method's profile against non-DP's: each flashdp region's median ms and its share of the non-DP step
    (both profiled), and the ``TOP_DIFFERENCES`` ops with the largest |DP − non-DP| median self time."""
    base_step = base["step_ms"]["median"]
    regions = {name: {"ms": op["ms"]["median"], "share_of_baseline_step": op["ms"]["median"] / base_step,
                      "calls": op["calls"]}
               for name, op in dp["ops"].items() if op["region"]}

    def median(prof: dict, name: str) -> float:
        op = prof["ops"].get(name)
        return op["ms"]["median"] if op is not None else 0.0

    names = [n for n in dict.fromkeys([*dp["ops"], *base["ops"]]) if not n.startswith(REGION_PREFIX)]
    diffs = sorted(({"op": n, "dp_ms": median(dp, n), "baseline_ms": median(base, n),
                     "difference_ms": median(dp, n) - median(base, n)} for n in names),
                   key=lambda d: -abs(d["difference_ms"]))
    return {"dp_step_ms": dp["step_ms"]["median"], "baseline_step_ms": base_step, "regions": regions,
            "largest_differences": diffs[:TOP_DIFFERENCES]}
