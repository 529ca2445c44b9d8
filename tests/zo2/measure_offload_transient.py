"""Measure the RSS an offloaded CPU step adds over what the step starts with; run in a fresh process.

Usage: ``python measure_offload_transient.py '<json list of cases>'``; each case is ``{"amp": null|"bf16",
"q": int, "loss": "hf"|"shifted"}``. Prints one JSON line per case: the step's measured increase of the RSS
high-water mark over the RSS just before it (``measured``), and ``zo2.plan_offload``'s ``activation_bytes``
for the same batch and loss (``planned``).

The second step is measured: the first one starts the halves' threads, whose per-thread buffers (the BLAS
library's packing buffers, thread stacks) then stay with the threads. Large allocations are served by their
own mappings (``memtrain.memory.tune_allocator``), so a freed tensor leaves the RSS at once.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import OPTConfig, OPTForCausalLM

import zo2
from memtrain.memory import peak_rss_bytes, release_freed_memory, reset_peak_rss, rss_bytes, tune_allocator

BATCH, SEQ, VOCAB = 4, 128, 8192


def build() -> OPTForCausalLM:
    """A 2-layer OPT whose step peaks at its loss (vocabulary 8192, hidden 128), in eval mode."""
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=SEQ, word_embed_proj_dim=128, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return OPTForCausalLM(cfg).eval()


def measure(amp: str | None, q: int, loss: str) -> dict:
    model = build()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    opt = zo2.ZOSGD(model.parameters(), lr=1e-7, eps=1e-3, num_perturbations=q, seed=0)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, verbose=False)
    if loss == "hf":
        def closure():
            return model(input_ids=ids, labels=ids).loss
        per_logit = None  # the plan's default: Hugging Face's loss
    else:  # the logits' shifted copy and their log-softmax, in the logits' dtype (no upcast)
        def closure():
            logits = model(input_ids=ids).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        per_logit = 3 * engine.plan.compute_itemsize
    opt.step(closure)
    release_freed_memory()
    reset_peak_rss()
    before = rss_bytes()
    opt.step(closure)
    measured = peak_rss_bytes() - before
    planned = engine.plan.activation_bytes(BATCH, SEQ, per_logit)
    engine.detach()
    return {"amp": amp, "q": q, "loss": loss, "measured": measured, "planned": planned}


if __name__ == "__main__":
    tune_allocator()
    for case in json.loads(sys.argv[1]):
        print(json.dumps(measure(**case)), flush=True)
