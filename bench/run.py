"""Runs the methods of a comparison in this process, interleaved round by round, and measures each one.

Each round, for each method in turn (A B C, then C B A the next round): build a fresh model and batch
(same seed for all), set the method up, run ``warmup`` untimed and ``steps`` timed steps, time its extra
measurements (the offload engine's transfers alone), then free it. The round's sample is the mean time of
its timed steps (CUDA events on a GPU); a method's times are the median and p20/p80 of its round samples,
and tokens/s counts each token once per step at the median. Memory is the increase over a baseline taken
just before the model is built, in three windows: build (weights and set-up), the first step (optimizer state
appears) and the steady steps (activations and temporaries); the record keeps the round with the
highest peak. Only one method's model is alive at a time, so each peak is the method's own.

On CPU each method is first run once on a tiny model of the same family ("priming"), so that the code
pages and thread pools it touches are resident before its baseline is taken. A method that raises is
recorded as failed (or unavailable) and the others still run.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ._harness import interleave, summarize, time_once
from .memory import MemoryProbe, RssTimeline
from .methods import Method, MethodUnavailable, Workload, freeze_all_but_linear
from .op_profile import merge_profiles, profile_steps
from .presets import PRESETS, build_model, model_config

PRIMERS = {"opt": "opt-tiny", "llama": "llama-tiny"}


@dataclass
class RunConfig:
    model: str
    batch: int
    seq: int
    dtype: torch.dtype
    device: str
    steps: int
    warmup: int
    trainable: str = "all"
    rounds: int = 1
    profile_memory: bool = False
    snapshot_dir: str | None = None
    prime: bool = True
    profile_ops: int = 0  # steps per round under torch.profiler, in a pass after the measured rounds (op_profile)
    options: dict = field(default_factory=dict)  # passed to the methods in Workload.options


def make_workload(model_name: str, cfg: RunConfig, method: Method, batch: int, seq: int) -> Workload:
    device = "cpu" if method.host_model else cfg.device
    model = build_model(model_name, cfg.dtype, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(cfg.device)
    if cfg.trainable == "linear":
        freeze_all_but_linear(model)
    return Workload(model, ids, cfg.device, cfg.trainable, dict(cfg.options))


def _prime(method: Method, cfg: RunConfig) -> None:
    family = PRESETS[cfg.model].family if cfg.model in PRESETS else None
    if family not in PRIMERS:
        return
    runner = method.setup(make_workload(PRIMERS[family], cfg, method, 2, 16))
    runner.step()
    runner.close()


def error_record(err: BaseException) -> dict:
    """A failed method's record: 'unavailable' (with the reason) or 'failed' (with the traceback's tail)."""
    if isinstance(err, MethodUnavailable):
        return {"status": "unavailable", "error": str(err)}
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": tb[-4000:]}


def run_method(method: Method, cfg: RunConfig, probe: MemoryProbe, bar: tqdm, primed: set,
               timeline: RssTimeline | None = None) -> dict:
    """One round of one method: set up, time and measure; never raises (a failure becomes the record)."""
    name = method.name
    record: dict = {"method": name, "label": method.label}
    runner = workload = None

    def phase(label: str) -> None:
        if timeline is not None:
            timeline.phase = f"{name}:{label}"

    try:
        if cfg.prime and not probe.cuda and name not in primed:
            phase("prime")
            _prime(method, cfg)
            primed.add(name)
        if cfg.profile_memory and probe.cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        probe.start()
        phase("build")
        workload = make_workload(cfg.model, cfg, method, cfg.batch, cfg.seq)
        runner = method.setup(workload)
        mem = {"build_peak": probe.peak(), "after_build": probe.current()}
        times, losses = [], []
        for i in range(cfg.warmup + cfg.steps):
            if i <= 1:
                probe.reset()
            phase("first step" if i == 0 else "step")
            out: list[float] = []
            t = time_once(lambda out=out: out.append(runner.step()), cfg.device)
            losses.append(out[0])
            if i >= cfg.warmup:
                times.append(t)
            if i == 0:
                mem["first_step_peak"], mem["after_first_step"] = probe.peak(), probe.current()
            bar.update(1)
        mem["steady_step_peak"] = probe.peak() if cfg.warmup + cfg.steps > 1 else mem["first_step_peak"]
        mem["peak"] = max(mem["build_peak"], mem["first_step_peak"], mem["steady_step_peak"])
        extras = {}
        for extra, fn in runner.extra_timings.items():
            phase(extra)
            try:
                extras[extra] = fn()
            except Exception as err:  # reported in the record; the step times still stand
                extras[extra] = error_record(err)
        record.update(status="ok", sample=sum(times) / len(times), step_times=times, losses=losses,
                      memory_kind=probe.kind, memory_bytes=mem, baseline_bytes=probe.baseline, extras=extras,
                      **probe.counters(), **runner.info)
        if probe.note:
            record["memory_note"] = probe.note
        if cfg.profile_memory and probe.cuda and cfg.snapshot_dir:
            path = f"{cfg.snapshot_dir}/{cfg.model}_{name}_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(path)
            record["memory_snapshot"] = path
        phase("close")
        runner.close()
    except Exception as err:  # a failing method is reported, the comparison goes on
        record.update(error_record(err))
        if probe.cuda and isinstance(err, torch.cuda.OutOfMemoryError):
            record["status"] = "out of memory"
    finally:
        if cfg.profile_memory and probe.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
        runner = workload = None  # free the model before the next method
        probe.collect()
        phase("idle")
    return record


def profile_round(method: Method, cfg: RunConfig, record: dict) -> None:
    """``--profile-ops``: profile ``cfg.profile_ops`` steps of a fresh set-up of ``method`` (after
    ``max(1, cfg.warmup)`` unprofiled steps) into ``record["op_profile"]`` (or ``op_profile_error``).

    Profiling runs in its own pass, after every measured round: a torch.profiler session with backward passes
    leaves freed small chunks in glibc's heap, which would read as extra RSS in the rounds measured after it.
    """
    runner = workload = None
    try:
        workload = make_workload(cfg.model, cfg, method, cfg.batch, cfg.seq)
        runner = method.setup(workload)
        for _ in range(max(1, cfg.warmup)):
            runner.step()
        record["op_profile"] = profile_steps(runner.step, cfg.profile_ops, cfg.device)
    except Exception as err:  # reported in the record; the step times and memory still stand
        record["op_profile_error"] = error_record(err)
    finally:
        if runner is not None:
            runner.close()
        runner = workload = None


def _merge_extra(values: list) -> dict:
    """One extra measurement over the rounds: its summary, or the first round's error."""
    errors = [v for v in values if isinstance(v, dict)]
    if errors:
        return {**errors[0], "failed_rounds": len(errors)}
    return {"status": "ok", **summarize(values)}


def merge_rounds(records: list[dict], tokens_per_step: int) -> dict:
    """One record per method: median, p20, p80 of the round samples (seconds per step), every sample, and
    the memory of the round with the highest peak. Failed rounds are counted and the first one's error kept."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return records[-1]
    merged = dict(max(ok, key=lambda r: r["memory_bytes"]["peak"]))
    for key in ("sample", "step_times", "losses", "extras", "op_profile"):
        merged.pop(key, None)
    merged.update(summarize([r["sample"] for r in ok]), unit="s/step",
                  step_times=[r["step_times"] for r in ok], losses=[x for r in ok for x in r["losses"]])
    merged["tokens_per_s"] = tokens_per_step / merged["median"]
    for extra in ok[0]["extras"]:
        merged[extra] = _merge_extra([r["extras"][extra] for r in ok])
    profiles = [r["op_profile"] for r in ok if "op_profile" in r]
    if profiles:
        merged["op_profile"] = merge_profiles(profiles)
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        merged["failed_rounds"] = len(failed)
        merged["failed_round_error"] = failed[0].get("error")
    return merged


def run_comparison(methods: dict[str, Method], cfg: RunConfig, timeline: RssTimeline | None = None) -> list[dict]:
    """Every method of ``methods`` on ``cfg.model``, in ``cfg.rounds`` interleaved rounds; one record each."""
    model_config(cfg.model)  # fail early on an unknown preset or path
    probe = MemoryProbe(cfg.device)
    primed: set[str] = set()
    total = cfg.rounds * len(methods) * (cfg.warmup + cfg.steps)
    with tqdm(total=total, desc=cfg.model, unit="step", leave=False, disable=None) as bar:
        def one_round(method: Method) -> dict:
            bar.set_postfix_str(method.name)
            rec = run_method(method, cfg, probe, bar, primed, timeline)
            if rec["status"] != "ok":
                bar.update(cfg.warmup + cfg.steps)
            return rec

        rounds = interleave({name: (lambda m=m: one_round(m)) for name, m in methods.items()}, cfg.rounds)
        if cfg.profile_ops:
            bar.set_postfix_str("profiling")
            for name, recs in rounds.items():
                for rec in recs:
                    if rec["status"] == "ok":
                        profile_round(methods[name], cfg, rec)
    return [merge_rounds(recs, cfg.batch * cfg.seq) for recs in rounds.values()]
