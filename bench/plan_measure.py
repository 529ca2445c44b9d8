"""Measured per-rank peak RSS of flashdp and zo2 steps under FSDP2 on CPU gloo ranks (checks plan_scale).

:func:`measure_fsdp_peaks` spawns ``world`` processes (torch.multiprocessing, gloo on 127.0.0.1). Each rank,
for each (preset, method): takes its RSS before building the model, builds it (random init), shards it
(every block, then the root, with ``fully_shard``) and sets up the method, returns freed memory and resets
its RSS high-water mark (``memtrain.memory``), runs ``steps`` steps on its ceil(B/N) rows, and reports the
high-water mark over the pre-build RSS. Each case runs twice and the second run is kept, so that what a
first call loads once (code pages, lazily built state, gloo's buffers) is not counted as the step's memory.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import tempfile

import torch

METHODS = ("flashdp", "zo2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(method: str, preset: str, batch: int):
    """A sharded model and its step function."""
    from torch.distributed.fsdp import fully_shard

    import flashdp
    import zo2
    from zo2.blocks import find_blocks

    from .presets import build_model

    model = build_model(preset, torch.float32, "cpu", seed=0)
    if method == "flashdp":
        model.train()
        flashdp.make_private(model, max_grad_norm=1.0)
    else:
        model.eval()
    for block in find_blocks(model)[1]:
        fully_shard(block)
    fully_shard(model)
    if method == "flashdp":
        opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                  expected_batch_size=batch, seed=0)

        def step(ids):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
        zo2.attach_fsdp(model, opt)

        def step(ids):
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    return model, opt, step


def _measure(method: str, preset: str, batch: int, seq: int, steps: int, rank: int, world: int) -> dict:
    from memtrain.memory import peak_rss_bytes, release_freed_memory, reset_peak_rss, rss_bytes

    from .presets import model_config

    rows = math.ceil(batch / world)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, model_config(preset).vocab_size, (rows, seq), generator=g)
    release_freed_memory()
    base = rss_bytes()
    model, opt, step = _setup(method, preset, batch)
    reset_peak_rss()  # returns the unsharded tensors fully_shard freed, then resets the high-water mark
    after_setup = rss_bytes() - base
    for _ in range(steps):
        step(ids)
    peak = peak_rss_bytes() - base
    del model, opt, step
    release_freed_memory()
    return {"peak_bytes": peak, "after_setup_bytes": after_setup}


def _rank(rank: int, world: int, port: int, out: str, cases: list, batch: int, seq: int, steps: int) -> None:
    import torch.distributed as dist

    from memtrain.memory import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for preset, method in cases:
            for _ in range(2):  # the second run is kept (see the module docstring)
                res[f"{preset} {method}"] = _measure(method, preset, batch, seq, steps, rank, world)
        pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure_fsdp_peaks(cases: list[tuple[str, str]], world: int = 2, batch: int = 8, seq: int = 256,
                       steps: int = 2) -> list[dict]:
    """Per rank: ``{"<preset> <method>": {"peak_bytes", "after_setup_bytes"}}`` (increases over the pre-build
    RSS) for each (preset, method in :data:`METHODS`) of ``cases``; ``batch`` is the global batch."""
    import torch.multiprocessing as mp

    unknown = [m for _, m in cases if m not in METHODS]
    if unknown:
        raise ValueError(f"measure_fsdp_peaks: unknown method(s) {unknown}; choose from {METHODS}")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), out, list(cases), batch, seq, steps), nprocs=world, join=True)
        return [json.loads(pathlib.Path(out, f"rank{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    print(json.dumps(measure_fsdp_peaks([("opt-tiny", "flashdp"), ("opt-tiny", "zo2"), ("llama-tiny", "flashdp"),
                                         ("llama-tiny", "zo2")]), indent=1))
