"""zo2.offload step against the plain zo2.ZOSGD step on the same model, interleaved in one process.

Commands (figures in bench/RESULTS.md):
    python bench/bench_zo_offload.py                                  # OPT-125m shapes, B=4, T=128, CPU
    python bench/bench_zo_offload.py --amp bf16                       # + the AMP engine (fp32 master)
    python bench/bench_zo_offload.py --preset opt-1.3b --device cuda --batch 1 --seq 2048 --amp bf16

With --device cpu the engine runs its whole schedule (copies into the ring, dual forward, deferred
update): "offload / plain" is the engine's own overhead. On CUDA the plain run holds the model on the
GPU and the offloaded one streams it, and the share of the bus time hidden behind compute is printed.
Both models share the device here, so peak memory is measured by the CLI, one method at a time:
``python -m bench zo --methods zo2,zo2-offload,zo2-offload-amp --device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zo2
from bench._harness import environment, interleaved, print_table, write_json
from bench.presets import PRESETS, build_model


def transfer_only(engine) -> None:
    """Every block up and (without AMP) back through the ring, with no compute: the bus time of a step."""
    ring = engine.ring
    for b, store in enumerate(engine.stores):
        slot = b % ring.slots
        ring.upload(slot, store.wire_flat)
        ring.wait_uploaded(slot)
        ring.release(slot, store.master_flat if engine.amp is None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="opt-125m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="also time the AMP engine")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain run (model larger than the device)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/zo_offload_<preset>_<device>.json)")
    args = ap.parse_args()

    host_model = build_model(args.preset, torch.float32, "cpu")
    n_params = sum(p.numel() for p in host_model.parameters())
    ids = torch.randint(0, host_model.config.vocab_size, (args.batch, args.seq), device=args.device)
    methods, opts, models = {}, {}, {}

    def add(name: str, model, opt) -> None:
        models[name], opts[name] = model, opt
        methods[name] = lambda: opt.step(lambda: model(input_ids=ids, labels=ids).loss)

    if not args.no_plain:
        plain = copy.deepcopy(host_model).to(args.device)
        add("plain ZOSGD", plain, zo2.ZOSGD(plain.parameters(), lr=1e-7, eps=1e-3, seed=0))
    offloaded = copy.deepcopy(host_model) if args.amp else host_model
    opt = zo2.ZOSGD(offloaded.parameters(), lr=1e-7, eps=1e-3, seed=0)
    engine = zo2.offload(offloaded, opt, device=args.device, prefetch=args.prefetch)
    add("zo2.offload", offloaded, opt)
    if args.amp:
        amp_model = host_model
        amp_opt = zo2.ZOSGD(amp_model.parameters(), lr=1e-7, eps=1e-3, seed=0)
        zo2.offload(amp_model, amp_opt, device=args.device, amp=args.amp, prefetch=args.prefetch, verbose=False)
        add(f"zo2.offload amp={args.amp}", amp_model, amp_opt)

    if args.device.startswith("cuda"):
        opt.flush()
        methods["transfers only"] = lambda: transfer_only(engine)
    stats = interleaved(methods, args.rounds, args.warmup, args.device)
    hidden = None
    if "transfers only" in stats and "plain ZOSGD" in stats:
        # Share of the bus time that does not show up in the step: 1 - (offloaded - plain) / transfers.
        extra = stats["zo2.offload"]["median_s"] - stats["plain ZOSGD"]["median_s"]
        hidden = 1.0 - max(extra, 0.0) / stats["transfers only"]["median_s"]
        print(f"transfer time hidden behind compute: {100 * hidden:.1f}%")
    base = stats.get("plain ZOSGD", stats["zo2.offload"])["median_s"]
    tokens = args.batch * args.seq
    rows = [[name, 1e3 * s["median_s"], 1e3 * s["p20_s"], 1e3 * s["p80_s"], s["median_s"] / base,
             tokens / s["median_s"]]
            for name, s in stats.items()]
    print_table(f"{args.preset} ({n_params / 1e6:.1f} M params), B={args.batch}, T={args.seq}, {args.device}, "
                f"prefetch={args.prefetch}, {args.rounds} interleaved rounds",
                ["method", "median ms", "p20 ms", "p80 ms", "/ plain", "tokens/s"], rows)
    write_json(f"zo_offload_{args.preset}_{args.device.split(':')[0]}", {
        "benchmark": "zo_offload", "config": vars(args), "n_params": n_params, "plan": str(engine.plan),
        "transfer_hidden_fraction": hidden,
        "results": {name: {**s, "ratio_to_plain": s["median_s"] / base, "tokens_per_s": tokens / s["median_s"]}
                  for name, s in stats.items()},
        "environment": environment(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
