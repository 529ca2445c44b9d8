"""Zeroth-order fine-tuning of an OPT on a small sentiment task, with zo2.ZOTrainer (forward passes only).

The data are generated here (review sentences built from word lists, labelled by the sentiment of
their adjective), so the example needs no download. The task is posed as MeZO does: the prompt
"<review> It was" is followed by the label word "great" or "terrible", and the loss is the cross-entropy
over those two words' logits at the answer position.

Zeroth-order fine-tuning needs a model whose features already separate the classes (MeZO starts from a
pretrained checkpoint). On CPU the example builds a tiny OPT (word-level vocabulary, random init) and
stands in for the checkpoint with a short first-order stage: AdamW language modelling on generated
two-sentence texts ("the plot was truly gripping . i loved it .", "the film is quite dull . It seemed awful .").
That corpus pairs the adjectives with other sentiment words but never contains the label words or the
prompt; the label words' output rows are then set to the mean row of the head (new tokens), so both
score the same and the accuracy before the ZO stage is chance. The ZO stage learns the label mapping.

CPU, 20 s on an idle 2-core machine, about 3 minutes when other jobs share it (400 AdamW steps, then
300 ZO steps over every weight):

    python examples/zo_opt_classification.py --steps 300

What to expect (200 held-out reviews): pretraining LM loss 3.83 -> 0.82; accuracy before the ZO stage
0.500 (the label words tie); ZO training loss 0.49 over the first 30 steps, 0.036 over the last 30;
accuracy after 300 ZO steps 1.000. Without the first-order stage (--pretrain-steps 0) the ZO loss stays
at 0.69 and the accuracy at 0.500. --train head (the LM head and the final layer norm only, lr 5e-3)
also reaches 1.000. The ZO stage itself runs at about 100 steps/s on an idle 2-core CPU.

A GPU with a real checkpoint (weights and tokenizer loaded by transformers; MeZO's SST-2 settings; the
pretraining stand-in is skipped and the label words are the checkpoint's own tokens), with the blocks
streamed through the GPU by the offload engine and computed in bf16 from an fp32 host master:

    python examples/zo_opt_classification.py --model facebook/opt-13b --steps 20000 --batch-size 16 \\
        --lr 1e-7 --eps 1e-3 --device cuda --offload --amp bf16
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import OPTConfig, OPTForCausalLM

from zo2.trainer import ZOTrainer, ZOTrainingArguments

POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "superb", "charming", "gripping"]
NEGATIVE = ["dull", "clumsy", "tedious", "awful", "boring", "shallow", "painful"]
SUBJECTS = ["the film", "this movie", "the acting", "the plot", "the ending", "the soundtrack", "the script"]
FILLERS = ["honestly", "overall", "really", "truly", "frankly", "quite"]
LABEL_WORDS = ["terrible", "great"]  # label 0, label 1
# Pretraining follow-ups: a second sentence whose words agree with the review's sentiment ({} = an adjective).
FOLLOW_UPS = [("i loved it .", "i hated it ."), ("we would recommend it .", "we would avoid it ."),
              ("It seemed {} .", "It seemed {} ."), ("it felt {} .", "it felt {} .")]


class Vocab:
    """A word-level vocabulary over every word the generator can produce (no tokenizer download)."""

    def __init__(self) -> None:
        words = {w for lst in (POSITIVE, NEGATIVE, FILLERS, LABEL_WORDS) for w in lst}
        words |= {w for pair in FOLLOW_UPS for s in pair for w in s.replace("{}", "").split()}
        words |= {w for s in SUBJECTS for w in s.split()} | {"was", "is", "it", "It", "."}
        self.itos = ["<pad>", "</s>", *sorted(words)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, text: str) -> list[int]:
        return [1] + [self.stoi[w] for w in text.replace(".", " .").split()]


class CheckpointVocab:
    """A pretrained checkpoint's own tokenizer behind Vocab's interface (``encode`` and ``stoi``)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.stoi: dict[str, int] = {}
        for word in LABEL_WORDS:
            ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise SystemExit(f"the label word {word!r} is {len(ids)} tokens for {name}'s tokenizer; "
                                 "choose LABEL_WORDS that are single tokens")
            self.stoi[word] = ids[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


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


def pretraining_corpus(vocab: Vocab, n: int, seed: int) -> torch.Tensor:
    """n generated two-sentence texts whose second sentence agrees with the first one's sentiment.

    This stands in for the text a real checkpoint was pretrained on: it teaches which words go together
    (positive adjectives with "loved", "recommend" and other positive adjectives), but it never contains
    the label words, so the prompt's answer "great"/"terrible" is not learned here.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        adjectives = POSITIVE if label else NEGATIVE
        follow = rng.choice(FOLLOW_UPS)[1 - label].format(rng.choice(adjectives))
        text = f"{rng.choice(SUBJECTS)} {rng.choice(['was', 'is'])} {rng.choice(FILLERS)} {rng.choice(adjectives)} ."
        rows.append([*vocab.encode(f"{text} {follow}"), 1])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding, 0 = <pad>


def pretrain(model: OPTForCausalLM, corpus: torch.Tensor, steps: int, batch_size: int, lr: float,
             seed: int) -> None:
    """First-order language modelling (AdamW, backward passes) on the corpus: a stand-in for a checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in tqdm(range(steps), desc="pretraining (AdamW, language modelling)"):
        ids = corpus[torch.randint(len(corpus), (batch_size,), generator=gen)]
        mask = (ids != 0).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0 or step + 1 == steps:
            tqdm.write(f"pretraining step {step + 1}: LM loss {loss.item():.3f}")
    model.eval()


@torch.no_grad()
def add_label_words(model: OPTForCausalLM, label_ids: list[int]) -> None:
    """Give the label words fresh output rows, both the mean row of the head (so they score the same).

    This is what adding new tokens to a pretrained vocabulary does. The pretraining corpus never uses
    the label words, but the optimizer still moved their rows (Adam turns the tiny softmax push on unused
    rows into full-size steps), enough to answer the prompt by accident; resetting them makes the ZO
    stage start from chance and learn the label mapping itself.
    """
    head = model.get_output_embeddings().weight
    others = [i for i in range(head.shape[0]) if i not in label_ids]
    head[label_ids] = head[others].mean(0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Reviews, vocab: Vocab, device: str) -> tuple[float, float]:
    """(accuracy, loss) on ``data``: the share of reviews whose label word scores higher than the other one at
    the answer position, and the cross-entropy over the two label words' logits there (ln 2 when they tie)."""
    words = torch.tensor([vocab.stoi[w] for w in LABEL_WORDS], device=device)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]).to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**batch).logits[:, -2, words].float()  # the position that predicts the last token
    truth = torch.tensor([label for _, label in data.items], device=device)
    loss = torch.nn.functional.cross_entropy(logits, truth).item()
    return (logits.argmax(-1) == truth).float().mean().item(), loss


class PromptZOTrainer(ZOTrainer):
    """ZOTrainer with MeZO's classification loss: cross-entropy over the label words' logits only."""

    def __init__(self, *args: Any, label_ids: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_ids = label_ids

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        words = torch.tensor(self.label_ids, device=inputs["input_ids"].device)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[:, -2, words].float()  # the position that predicts the label word
        target = (inputs["labels"][:, -1].unsqueeze(1) == words).float().argmax(1)
        loss = torch.nn.functional.cross_entropy(logits, target)
        return (loss, outputs) if return_outputs else loss


def build_model(name: str, vocab: Vocab, hidden: int, layers: int) -> torch.nn.Module:
    """The tiny random-init OPT over the word vocabulary, or a pretrained checkpoint (float32, on the CPU:
    the Trainer or the offload engine places it)."""
    if name != "tiny":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)
    config = OPTConfig(vocab_size=len(vocab.itos), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                       num_attention_heads=max(1, hidden // 16), max_position_embeddings=64,
                       word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    return OPTForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (a random-init OPT built from --hidden/--layers) or a local checkpoint path")
    p.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    p.add_argument("--pretrain-steps", type=int, default=400,
                   help="AdamW language-modelling steps before the ZO stage (the stand-in for a checkpoint; "
                        "0 skips it)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3, help="AdamW learning rate of the pretraining stage")
    p.add_argument("--steps", type=int, default=300, help="ZO steps")
    p.add_argument("--batch-size", type=int, default=16, help="samples per ZO step")
    p.add_argument("--lr", type=float, default=1e-3, help="ZOSGD learning rate")
    p.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale ε")
    p.add_argument("--train-size", type=int, default=512, help="generated training reviews")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--offload", action="store_true", help="stream blocks with zo2.offload")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="with --offload: fp32 master on the host, blocks computed in bf16/fp16")
    p.add_argument("--train", choices=["all", "head"], default="all",
                   help="'all': every weight (what MeZO does); 'head': only the LM head (the token embeddings "
                        "where they are tied) and the final layer norm")
    p.add_argument("--output-dir", default="zo_opt_out", help="the Trainer's output directory")
    p.add_argument("--metrics-json", default=None,
                   help="also write the accuracies and the logged ZO training losses to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and directions")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    tiny = args.model == "tiny"
    vocab = Vocab() if tiny else CheckpointVocab(args.model)
    train, test = Reviews(vocab, args.train_size, args.seed), Reviews(vocab, 200, args.seed + 1)
    model = build_model(args.model, vocab, args.hidden, args.layers).eval()
    if tiny:  # a checkpoint is pretrained already and knows its label words
        if args.pretrain_steps:
            corpus = pretraining_corpus(vocab, 4 * args.train_size, args.seed + 2)
            pretrain(model, corpus, args.pretrain_steps, 32, args.pretrain_lr, args.seed)
        add_label_words(model, [vocab.stoi[w] for w in LABEL_WORDS])
    if args.train == "head":
        head = model.get_output_embeddings().weight  # the token embeddings where they are tied to the head
        for name, param in model.named_parameters():
            param.requires_grad_(param is head or "decoder.final_layer_norm" in name)
    before = evaluate(model, test, vocab, "cpu") if tiny or args.device == "cpu" else (None, None)
    if before[0] is not None:
        print(f"accuracy before the ZO stage: {before[0]:.3f} (held-out loss {before[1]:.3f})")
    offload = {"device": args.device, "amp": args.amp} if args.offload else None
    targs = ZOTrainingArguments(output_dir=args.output_dir, max_steps=args.steps,
                                per_device_train_batch_size=args.batch_size,
                                learning_rate=args.lr, zo_eps=args.eps, lr_scheduler_type="constant",
                                logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
                                seed=args.seed, use_cpu=args.device == "cpu", zo_offload=offload)
    trainer = PromptZOTrainer(model=model, args=targs, train_dataset=train,
                              label_ids=[vocab.stoi[w] for w in LABEL_WORDS])
    trainer.train()  # tqdm progress bar from the Trainer
    trainer.zo.flush()
    device = args.device  # offloaded or not, the embeddings and the head are on args.device
    after = evaluate(model, test, vocab, device)
    print(f"accuracy after {args.steps} ZO steps: {after[0]:.3f} (held-out loss {after[1]:.3f})")
    if args.metrics_json:
        metrics = {"accuracy_before": before[0], "accuracy_after": after[0], "test_loss_before": before[1],
                   "test_loss_after": after[1], "zo_steps": args.steps, "test_size": len(test),
                   "zo_train_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
        pathlib.Path(args.metrics_json).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
