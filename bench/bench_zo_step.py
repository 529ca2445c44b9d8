"""One zo2.ZOSGD step against the same model's two forward passes, with the textbook MeZO step as baseline.

Commands (figures in bench/RESULTS.md):
    python bench/bench_zo_step.py                                   # OPT-125m shapes, B=4, T=128, CPU
    python bench/bench_zo_step.py --preset opt-1.3b --device cuda --dtype bfloat16   # on a GPU

All methods run in one process, interleaved round by round. "two forwards" is the floor any
two-point zeroth-order step pays; the ratio step / two forwards is the optimizer's whole overhead.
"""

from __future__ import annotations

import argparse
import random

import torch
from _harness import environment, interleaved, print_table, write_json
from transformers import OPTConfig, OPTForCausalLM

import zo2

PRESETS = {
    "opt-tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                     word_embed_proj_dim=512),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
}


def build_model(preset: str, dtype: torch.dtype, device: str) -> OPTForCausalLM:
    spec = dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0)
    spec.update(PRESETS[preset])
    spec.setdefault("word_embed_proj_dim", spec["hidden_size"])
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**spec)).to(device=device, dtype=dtype).eval()


def textbook_mezo_step(model, closure, lr: float, eps: float, weight_decay: float) -> float:
    """MeZO's reference step: four passes over the parameters, z redrawn by torch.normal from a reset seed."""
    params = [p for p in model.parameters() if p.requires_grad]
    seed = random.randint(0, 2**31 - 1)

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        perturb(1)
        loss_plus = closure()
        perturb(-2)
        loss_minus = closure()
        perturb(1)
        g = float(loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data - lr * (g * z + weight_decay * p.data)
    return float(loss_plus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="opt-125m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/zo_step_<preset>_<device>.json)")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    model = build_model(args.preset, dtype, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 50272, (args.batch, args.seq), device=args.device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    def two_forwards():
        with torch.no_grad():
            closure()
            closure()

    opt = zo2.ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, seed=0)
    methods = {
        "two forwards": two_forwards,
        "zo2.ZOSGD step": lambda: opt.step(closure),
        "textbook MeZO step": lambda: textbook_mezo_step(model, closure, 1e-7, 1e-3, 0.0),
    }
    stats = interleaved(methods, args.rounds, args.warmup, args.device)
    base = stats["two forwards"]["median_s"]
    tokens = args.batch * args.seq
    rows = [[name, 1e3 * s["median_s"], 1e3 * s["p20_s"], 1e3 * s["p80_s"], s["median_s"] / base,
             tokens / s["median_s"]] for name, s in stats.items()]
    print_table(f"{args.preset} ({n_params / 1e6:.1f} M params, {args.dtype}), B={args.batch}, T={args.seq}, "
                f"{args.device}, {args.rounds} interleaved rounds",
                ["method", "median ms", "p20 ms", "p80 ms", "/ two forwards", "tokens/s"], rows)
    write_json(f"zo_step_{args.preset}_{args.device.split(':')[0]}", {
        "benchmark": "zo_step", "config": vars(args), "n_params": n_params,
        "results": {name: {**s, "ratio_to_two_forwards": s["median_s"] / base, "tokens_per_s": tokens / s["median_s"]}
                    for name, s in stats.items()},
        "environment": environment(args.device),
    }, args.out)


if __name__ == "__main__":
    main()
