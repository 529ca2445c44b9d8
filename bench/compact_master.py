"""Does a compact ZO master (16-bit base + stochastically rounded fp16 residual) keep the fp32 master's trajectory?

    python -m memtrain.bench.compact_master [--steps 1000] [--seeds 3] [--out PATH]

1. Pre-train a small Llama (random init from a config) with AdamW on sequences of a generated Markov chain A,
   then store it in bf16 (safetensors) and load it back: the "checkpoint".
2. Fine-tune the checkpoint with MeZO (:func:`zo2.compact_master.zo_step`) on a different generated task, chain
   B (same successor sets as A, new transition probabilities), with each master of ``--variants``:
   ``fp32`` (zo2's AMP master), ``compact`` (bf16 base + fp16 residual), ``bf16`` (a plain bf16 master,
   round-to-nearest: the known-bad baseline), and optionally ``compact-bf16`` (a bf16 residual); ``--seeds``
   seeds each (a seed fixes the batches, z and the rounding bits; seed s of every variant sees the same batches).
3. Held-out loss (fixed sequences of B) every ``--eval-every`` steps. The fp32 spread at an evaluation is the
   min-max over its seeds; a variant's curve is the mean over its seeds. Verdict: the compact master ships iff
   its curve lies inside the fp32 spread at every evaluation after step 0.

Forward passes run in fp32 for every variant, so the only difference is how the master stores θ. One torch
thread (the runs are small; more threads only contend on a loaded machine). Deterministic for given options.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from zo2.compact_master import CompactMaster, FP32Master, RoundedMaster, zo_step

from ._harness import print_table, provenance, write_json

VARIANTS = ("fp32", "compact", "bf16", "compact-bf16")


# ----------------------------------------------------------------------------------------------- data
def markov_chains(vocab: int, successors: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Transition matrices of tasks A and B (vocab x vocab): each token has ``successors`` possible next tokens
    (the same set in A and B) with Dirichlet(1) probabilities drawn independently for A and B."""
    g = torch.Generator().manual_seed(seed)
    support = torch.stack([torch.randperm(vocab, generator=g)[:successors] for _ in range(vocab)])
    chains = []
    for _ in range(2):
        w = -torch.log(torch.rand(vocab, successors, generator=g))  # Exp(1) weights, normalised: Dirichlet(1)
        p = torch.zeros(vocab, vocab)
        p.scatter_(1, support, w / w.sum(1, keepdim=True))
        chains.append(p)
    return chains[0], chains[1]


def sample(chain: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """``batch`` sequences of ``length`` tokens from ``chain`` (uniform first token)."""
    x = torch.empty(batch, length, dtype=torch.int64)
    x[:, 0] = torch.randint(chain.shape[0], (batch,), generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(chain[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def entropy_rate(chain: torch.Tensor) -> float:
    """The chain's conditional entropy per token (nats) under its stationary distribution: the best loss."""
    evals, evecs = torch.linalg.eig(chain.double().T)
    pi = evecs[:, torch.argmin((evals - 1).abs())].real
    pi = pi / pi.sum()
    h = -(chain.double() * torch.log(chain.double().clamp_min(1e-300))).sum(1)
    return float((pi * h).sum())


# ---------------------------------------------------------------------------------------------- model
def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.data_seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                      num_key_value_heads=max(1, args.hidden // 32), max_position_embeddings=args.seq_len)
    return LlamaForCausalLM(cfg).eval()


def pretrain(model: LlamaForCausalLM, chain: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """AdamW on chain A; returns the training loss every 50 steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.data_seed + 1)
    losses = []
    for step in range(args.pretrain_steps):
        x = sample(chain, args.batch, args.seq_len, g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.pretrain_steps - 1:
            losses.append(round(loss.item(), 5))
    model.eval()
    return losses


def checkpoint_bf16(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Save the parameters in bf16 (safetensors) and load them back: what a fine-tune starts from."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}, str(path))
        return load_file(str(path))


def make_master(variant: str, ckpt: dict[str, torch.Tensor], seed: int):
    if variant == "fp32":
        return FP32Master(ckpt)
    if variant == "compact":
        return CompactMaster(ckpt, seed, residual_dtype=torch.float16)
    if variant == "compact-bf16":
        return CompactMaster(ckpt, seed, residual_dtype=torch.bfloat16)
    if variant == "bf16":
        return RoundedMaster(ckpt, torch.bfloat16)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def fine_tune(model: LlamaForCausalLM, ckpt: dict[str, torch.Tensor], chain: torch.Tensor, held_out: torch.Tensor,
              variant: str, seed: int, args: argparse.Namespace) -> dict:
    """MeZO on chain B from the checkpoint; the held-out loss every ``eval_every`` steps."""
    master = make_master(variant, ckpt, seed)

    def loss_at(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, args=(), kwargs={"input_ids": x, "labels": x}).loss

    g = torch.Generator().manual_seed(seed)
    curve, steps = [], []
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                curve.append(float(loss_at(master.values(), held_out)))
            steps.append(step)
        if step == args.steps:
            break
        x = sample(chain, args.batch, args.seq_len, g)
        zo_step(master, lambda p, x=x: loss_at(p, x), step, args.lr, args.eps, seed)
    record = {"variant": variant, "seed": seed, "eval_steps": steps, "held_out_loss": curve,
              "bytes_per_param": master.bytes_per_param(), "seconds": round(time.perf_counter() - start, 1)}
    if isinstance(master, CompactMaster):
        r = torch.cat([t.float().abs().flatten() for t in master.residual.values()])
        record["residual_abs"] = {"max": r.max().item(), "p50": r.median().item(),
                                  "fraction_zero": (r == 0).float().mean().item()}
    return record


# -------------------------------------------------------------------------------------------- verdict
def verdict(runs: list[dict], eval_steps: list[int]) -> dict:
    """Per variant: mean curve over seeds, and whether it lies inside the fp32 min-max spread after step 0."""
    curves: dict[str, list[list[float]]] = {}
    for r in runs:
        curves.setdefault(r["variant"], []).append(r["held_out_loss"])
    ref = torch.tensor(curves["fp32"], dtype=torch.float64)
    lo, hi = ref.min(0).values, ref.max(0).values
    out = {"fp32_spread": {"min": lo.tolist(), "max": hi.tolist()}, "variants": {}}
    for v, c in curves.items():
        mean = torch.tensor(c, dtype=torch.float64).mean(0)
        inside = ((mean >= lo) & (mean <= hi))[1:]  # step 0: every variant starts from the same checkpoint
        out["variants"][v] = {"mean": mean.tolist(), "inside_at": int(inside.sum()), "evaluations": len(inside),
                              "inside_everywhere": bool(inside.all()),
                              "final_mean_minus_fp32_mean": float(mean[-1] - ref.mean(0)[-1])}
    compact = out["variants"].get("compact")
    out["compact_ships"] = None if compact is None else compact["inside_everywhere"]
    out["rule"] = ("the compact master ships iff the mean over its seeds of the held-out loss lies inside the min-max "
                   "over the fp32 master's seeds at every evaluation after step 0")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m memtrain.bench.compact_master", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    a("--hidden", type=int, default=128, help="hidden size (default 128; intermediate 2x, heads hidden/32)")
    a("--layers", type=int, default=2, help="decoder layers (default 2)")
    a("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    a("--batch", type=int, default=8, help="sequences per step, pre-training and fine-tuning (default 8)")
    a("--successors", type=int, default=4, help="next-token choices per token in both chains (default 4)")
    a("--pretrain-steps", type=int, default=300, help="AdamW steps on chain A (default 300)")
    a("--pretrain-lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    a("--steps", type=int, default=1000, help="MeZO steps on chain B per run (default 1000)")
    a("--lr", type=float, default=1e-4, help="MeZO learning rate (default 1e-4)")
    a("--eps", type=float, default=1e-3, help="MeZO perturbation scale (default 1e-3)")
    a("--eval-every", type=int, default=50, help="steps between held-out evaluations (default 50)")
    a("--held-out", type=int, default=64, help="held-out sequences of chain B (default 64)")
    a("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    a("--variants", default="fp32,compact,bf16", help=f"comma-separated, from {','.join(VARIANTS)}")
    a("--data-seed", type=int, default=0, help="seed of the chains, the init and pre-training (default 0)")
    a("--out", default=None, help="JSON path (default bench/results/compact-master/compact-master.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "fp32" not in variants:
        raise SystemExit(f"--variants: need fp32 and names from {VARIANTS}, got {args.variants!r}")
    torch.set_num_threads(1)
    chain_a, chain_b = markov_chains(args.vocab, args.successors, args.data_seed)
    model = build(args)
    t0 = time.perf_counter()
    pre = pretrain(model, chain_a, args)
    print(f"pre-trained {sum(p.numel() for p in model.parameters())} parameters in {time.perf_counter() - t0:.0f} s; "
          f"loss {pre[0]:.3f} -> {pre[-1]:.3f} (chain A entropy rate {entropy_rate(chain_a):.3f})")
    ckpt = checkpoint_bf16(model)
    held_out = sample(chain_b, args.held_out, args.seq_len, torch.Generator().manual_seed(args.data_seed + 2))
    runs = []
    for seed in range(args.seeds):
        for v in variants:
            r = fine_tune(model, ckpt, chain_b, held_out, v, seed, args)
            print(f"{v:>12} seed {seed}: held-out {r['held_out_loss'][0]:.4f} -> {r['held_out_loss'][-1]:.4f} "
                  f"({r['seconds']} s)", flush=True)
            runs.append(r)
    steps = runs[0]["eval_steps"]
    result = verdict(runs, steps)
    header = ["step", "fp32 min", "fp32 max"] + [f"{v} mean" for v in variants]
    rows = [[s, result["fp32_spread"]["min"][i], result["fp32_spread"]["max"][i]]
            + [result["variants"][v]["mean"][i] for v in variants] for i, s in enumerate(steps)]
    print_table("held-out loss on chain B (mean over seeds; fp32 spread = min-max over seeds)", header, rows)
    for v in variants:
        info = result["variants"][v]
        print(f"{v}: inside the fp32 spread at {info['inside_at']}/{info['evaluations']} evaluations; final mean "
              f"- fp32 mean {info['final_mean_minus_fp32_mean']:+.5f}")
    if result["compact_ships"] is not None:  # the rule is about the fp16-residual variant, "compact"
        print(f"verdict: the compact master {'ships' if result['compact_ships'] else 'does not ship'}")
    record = {**provenance("cpu", argv), "options": vars(args), "pretrain_loss": pre,
              "entropy_rate": {"A": entropy_rate(chain_a), "B": entropy_rate(chain_b)}, "runs": runs,
              "verdict": result}
    write_json("compact-master/compact-master", record, args.out)
    return record


if __name__ == "__main__":
    main()
