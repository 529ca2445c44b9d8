"""``memtrain-demo``: a short zeroth-order fine-tune of a small OPT on CPU.

The model is built from a config (random init, nothing downloaded) and warm-started with a few AdamW
steps on generated data (arithmetic token sequences), as a pretrained checkpoint would be; then
``zo2.ZOSGD`` fine-tunes it with forward passes only. Progress, held-out loss, step time and peak
memory are printed, and the held-out loss goes down.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM

import zo2
from memtrain.memory import peak_rss_bytes

VOCAB = 64


def arithmetic_sequences(n: int, seed: int, length: int = 24) -> torch.Tensor:
    """Sequences start, start + stride, ... (mod VOCAB) with stride 1..4 given by the first token's parity bits."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = 1 + start % 4
    return (start + stride * torch.arange(length)) % VOCAB


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (memtrain.memory, the same counter the benchmarks read)."""
    return peak_rss_bytes() / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="zeroth-order steps")
    p.add_argument("--warmup-steps", type=int, default=20, help="first-order AdamW steps before ZO")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--perturbations", type=int, default=4, help="directions averaged per step (q)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the start and end held-out losses and the printed rows."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    baseline_mb = peak_rss_mb()  # Python, torch and transformers, before the model exists
    config = OPTConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=4 * args.hidden, num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=args.hidden, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    train, held = arithmetic_sequences(2048, seed=args.seed), arithmetic_sequences(256, seed=args.seed + 1)
    rng = torch.Generator().manual_seed(args.seed)

    def batch() -> torch.Tensor:
        return train[torch.randint(0, len(train), (args.batch_size,), generator=rng)]

    def loss_on(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def held_loss() -> float:
        with torch.no_grad():
            return loss_on(held).item()

    print(f"memtrain demo: OPT ({args.layers} layers, hidden {args.hidden}, {n_params / 1e3:.0f}k parameters) "
          f"on CPU, {torch.get_num_threads()} threads")
    adam = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in tqdm(range(args.warmup_steps), desc="first-order warm-up", leave=False, disable=None):
        loss_on(batch()).backward()
        adam.step()
        adam.zero_grad()
    del adam
    model.eval()  # ZO needs no train mode, and dropout must be off
    start_loss = held_loss()
    print(f"after {args.warmup_steps} AdamW warm-up steps: held-out loss {start_loss:.4f}")

    opt = zo2.ZOSGD(model.parameters(), lr=args.lr, eps=args.eps, seed=args.seed,
                    num_perturbations=args.perturbations)
    print(f"zo2.ZOSGD: lr={args.lr} eps={args.eps} q={args.perturbations} "
          f"({2 * args.perturbations} forward passes per step, no backward)")
    print(f"ms/step: median of the last {args.eval_every} steps; peak RSS: the whole process's high-water mark, "
          f"{baseline_mb:.0f} MB of it Python and torch before the model was built, {model_mb:.1f} MB the "
          "model's parameters")
    print(f"{'step':>6} {'train loss':>11} {'held-out':>9} {'ms/step':>8} {'peak RSS MB':>12}")
    times: list[float] = []
    history = []
    bar = tqdm(range(1, args.steps + 1), desc="zeroth-order", leave=False, disable=None)
    for step in bar:
        ids = batch()
        t0 = time.perf_counter()
        loss = opt.step(lambda ids=ids: loss_on(ids))
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.eval_every == 0 or step == args.steps:
            recent = sorted(times[-args.eval_every:])
            row = (step, loss.item(), held_loss(), 1e3 * recent[len(recent) // 2], peak_rss_mb())
            history.append(row)
            tqdm.write(f"{row[0]:>6} {row[1]:>11.4f} {row[2]:>9.4f} {row[3]:>8.1f} {row[4]:>12.0f}")
    end_loss = held_loss()
    change = 100 * (end_loss - start_loss) / start_loss
    print(f"held-out loss {start_loss:.4f} -> {end_loss:.4f} ({change:+.1f}%) in {args.steps} zeroth-order steps; "
          f"median step {1e3 * sorted(times)[len(times) // 2]:.1f} ms over all {len(times)} steps; peak RSS "
          f"{peak_rss_mb():.0f} MB (whole process: {baseline_mb:.0f} MB before the model was built, "
          f"{model_mb:.1f} MB of parameters)")
    return {"start_loss": start_loss, "end_loss": end_loss, "history": history}


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`memtrain-demo`): returns None so that the exit status is 0."""
    run(argv)


if __name__ == "__main__":
    main()
