"""Differentially private fine-tuning of a Llama-style model with flashdp.DPTrainer.

The data are generated here: short "records" in a toy language (a name, a city and a number, in one of a
few sentence shapes), the kind of data one wants to learn from without memorising any single record.
The model is a Llama built from a config with random initialisation (no download). DPTrainer makes it
private (per-layer clipping inside the backward), samples Poisson batches, adds the noise once per step
and logs ε at δ after every epoch; σ is calibrated for the target ε.

CPU, a few minutes (tiny model):

    python examples/dp_llama_finetune.py --epochs 3 --target-epsilon 8

A GPU with a real checkpoint (weights downloaded by transformers; use its tokenizer instead of the toy
vocabulary, and your data set):

    python examples/dp_llama_finetune.py --model meta-llama/Llama-3.2-1B --epochs 3 --batch-size 256 \\
        --lr 5e-4 --target-epsilon 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from flashdp.trainer import DPTrainer, DPTrainingArguments

NAMES = ["ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ivy", "jo"]
CITIES = ["oslo", "lima", "rome", "kyiv", "pune", "nice", "bern", "baku"]
SHAPES = ["{n} lives in {c} and is {a}", "{n} , {a} , moved to {c}", "in {c} lives {n} aged {a}"]


class Records(Dataset):
    """n generated records as fixed-length token ids (labels = inputs: next-token prediction)."""

    def __init__(self, n: int, seed: int, length: int = 12) -> None:
        words = sorted({w for s in SHAPES for w in s.split() if "{" not in w} | set(NAMES) | set(CITIES)
                       | {str(a) for a in range(18, 90)})
        self.itos = ["<pad>", "<s>", *words]
        stoi = {w: i for i, w in enumerate(self.itos)}
        rng = random.Random(seed)
        self.rows = []
        for _ in range(n):
            text = rng.choice(SHAPES).format(n=rng.choice(NAMES), c=rng.choice(CITIES), a=rng.randrange(18, 90))
            ids = [1] + [stoi[w] for w in text.split()]
            self.rows.append(torch.tensor((ids + [0] * length)[:length]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        labels = ids.masked_fill(ids == 0, -100)
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Records, device: str) -> float:
    model.eval()
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]).to(device)
             for k in ("input_ids", "attention_mask", "labels")}
    return math.exp(model(**batch).loss.item())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (a random-init Llama built from --hidden/--layers) or a local checkpoint path")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    p.add_argument("--epochs", type=float, default=3, help="expected epochs (each 1/q Poisson steps)")
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--train-size", type=int, default=2048, help="generated private training records")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--target-epsilon", type=float, default=8.0,
                   help="ε the whole run may spend (σ is calibrated to it)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the (ε, δ) guarantee")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="C: the whole per-sample clipped gradient's norm bound")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--output-dir", default="dp_llama_out", help="the Trainer's output directory")
    p.add_argument("--metrics-json", default=None,
                   help="also write the perplexities and the privacy spent to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and noise")
    args = p.parse_args(argv)

    if args.model != "tiny":
        raise SystemExit("with a pretrained --model, tokenise your data with AutoTokenizer.from_pretrained(name) "
                         "and load LlamaForCausalLM.from_pretrained(name) in place of the toy set-up")
    torch.manual_seed(args.seed)
    train, test = Records(args.train_size, args.seed), Records(256, args.seed + 1)
    config = LlamaConfig(vocab_size=len(train.itos), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 16),
                         num_key_value_heads=max(1, args.hidden // 32), max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    before = perplexity(model, test, "cpu")
    print(f"perplexity before: {before:.2f}")
    targs = DPTrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs,
                                per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                lr_scheduler_type="constant", dp_target_epsilon=args.target_epsilon,
                                dp_delta=args.delta, dp_max_grad_norm=args.max_grad_norm, logging_strategy="epoch",
                                save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.device == "cpu")
    trainer = DPTrainer(model=model, args=targs, train_dataset=train)
    sigma = trainer.noise_multiplier  # calibrated for the target ε (an accountant search: read it once)
    print(f"noise multiplier for ε={args.target_epsilon} at δ={args.delta}: {sigma:.3f}")
    trainer.train()  # tqdm progress bar from the Trainer; ε logged each epoch
    after = perplexity(model, test, args.device)
    epsilon = trainer.epsilon()
    print(f"perplexity after: {after:.2f}")
    print(f"privacy spent: epsilon={epsilon:.3f} at delta={args.delta}")
    if args.metrics_json:
        metrics = {"perplexity_before": before, "perplexity_after": after, "epsilon": epsilon, "delta": args.delta,
                   "target_epsilon": args.target_epsilon, "noise_multiplier": sigma,
                   "steps": trainer.state.global_step, "vocab_size": len(train.itos)}
        pathlib.Path(args.metrics_json).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
