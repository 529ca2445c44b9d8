"""Zeroth-order fine-tuning of an OPT on a small sentiment task, with zo2.ZOTrainer (forward passes only).

The data are generated here (review sentences built from word lists, labelled by the sentiment of
their adjective), so the example needs no download: the model is an OPT built from a config with random
initialisation and a word-level vocabulary. The task is posed as MeZO does: the prompt
"<review> It was" is followed by the label word "great" or "terrible", and only that word is scored.

CPU, a few minutes (tiny model):

    python examples/zo_opt_classification.py --steps 300

What to expect: from a random start, the loss drops within a few hundred steps as the model learns to
answer with one of the two label words, but accuracy stays near chance on CPU in minutes. Zeroth-order
fine-tuning relies on a pretrained model whose features already separate the classes (MeZO's setting);
the tiny random model shows the pipeline (ZOTrainer, schedule, logging, evaluation), not the accuracy.

A GPU with a real checkpoint (the weights are downloaded by transformers; MeZO's SST-2 settings), with
the blocks streamed through the GPU by the offload engine:

    python examples/zo_opt_classification.py --model facebook/opt-13b --steps 20000 --batch-size 16 \\
        --lr 1e-7 --eps 1e-3 --device cuda --offload
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.utils.data import Dataset
from transformers import OPTConfig, OPTForCausalLM

import zo2
from zo2.trainer import ZOTrainer, ZOTrainingArguments

POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping"]
NEGATIVE = ["dull", "clumsy", "tedious", "awful", "boring", "shallow", "painful"]
SUBJECTS = ["the film", "this movie", "the acting", "the plot", "the ending", "the soundtrack", "the script"]
FILLERS = ["honestly", "overall", "really", "truly", "frankly", "quite"]
LABEL_WORDS = ["terrible", "great"]  # label 0, label 1


class Vocab:
    """A word-level vocabulary over every word the generator can produce (no tokenizer download)."""

    def __init__(self) -> None:
        words = {w for lst in (POSITIVE, NEGATIVE, FILLERS, LABEL_WORDS) for w in lst}
        words |= {w for s in SUBJECTS for w in s.split()} | {"was", "is", "it", "It", "."}
        self.itos = ["<pad>", "</s>", *sorted(words)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, text: str) -> list[int]:
        return [1] + [self.stoi[w] for w in text.replace(".", " .").split()]


class Reviews(Dataset):
    """n generated reviews: input_ids of "<review> It was <label word>", labels on the label word only."""

    def __init__(self, vocab: Vocab, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.items = []
        for _ in range(n):
            label = rng.randrange(2)
            adj = rng.choice(POSITIVE if label else NEGATIVE)
            text = f"{rng.choice(SUBJECTS)} {rng.choice(['was', 'is'])} {rng.choice(FILLERS)} {adj} . It was"
            ids = [*vocab.encode(text), vocab.stoi[LABEL_WORDS[label]]]
            self.items.append((ids, label))
        self.width = max(len(ids) for ids, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, _ = self.items[i]
        pad = self.width - len(ids)
        input_ids = torch.tensor([0] * pad + ids)  # left padding: the label word is always last
        labels = torch.full_like(input_ids, -100)
        labels[-1] = input_ids[-1]
        return {"input_ids": input_ids, "attention_mask": (torch.arange(self.width) >= pad).long(),
                "labels": labels}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Reviews, vocab: Vocab, device: str) -> float:
    """Share of reviews whose label word scores higher than the other one at the answer position."""
    words = torch.tensor([vocab.stoi[w] for w in LABEL_WORDS], device=device)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]).to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**batch).logits[:, -2, words]  # the position that predicts the last token
    truth = torch.tensor([label for _, label in data.items], device=device)
    return (logits.argmax(-1) == truth).float().mean().item()


def build_model(name: str, vocab: Vocab, hidden: int, layers: int) -> OPTForCausalLM:
    if name != "tiny":
        raise SystemExit("with a pretrained --model use its own tokenizer: adapt Vocab to "
                         "AutoTokenizer.from_pretrained(name) and load OPTForCausalLM.from_pretrained(name)")
    config = OPTConfig(vocab_size=len(vocab.itos), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                       num_attention_heads=max(1, hidden // 16), max_position_embeddings=64,
                       word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return OPTForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", action="store_true", help="stream blocks with zo2.offload")
    p.add_argument("--train", choices=["all", "head"], default="head",
                   help="'head': only the (tied) token embeddings / LM head and the final layer norm, which ZO "
                        "moves in few steps from a random start; 'all': every weight (what MeZO does from a "
                        "pretrained checkpoint)")
    p.add_argument("--output-dir", default="zo_opt_out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    vocab = Vocab()
    train, test = Reviews(vocab, args.train_size, args.seed), Reviews(vocab, 200, args.seed + 1)
    model = build_model(args.model, vocab, args.hidden, args.layers).eval()
    if args.train == "head":
        for name, param in model.named_parameters():
            param.requires_grad_("embed_tokens" in name or "decoder.final_layer_norm" in name)
    print(f"accuracy before: {accuracy(model, test, vocab, 'cpu'):.3f}")
    offload = {"device": args.device} if args.offload else None
    if offload is not None and not hasattr(zo2, "offload"):
        raise SystemExit("--offload needs zo2.offload (the offload engine), which this build lacks")
    targs = ZOTrainingArguments(output_dir=args.output_dir, max_steps=args.steps,
                                per_device_train_batch_size=args.batch_size,
                                learning_rate=args.lr, zo_eps=args.eps, lr_scheduler_type="constant",
                                logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
                                seed=args.seed, use_cpu=args.device == "cpu", zo_offload=offload)
    trainer = ZOTrainer(model=model, args=targs, train_dataset=train)
    trainer.train()  # tqdm progress bar from the Trainer
    trainer.zo.flush()
    device = "cpu" if args.offload else args.device
    print(f"accuracy after {args.steps} ZO steps: {accuracy(model, test, vocab, device):.3f}")


if __name__ == "__main__":
    main()
