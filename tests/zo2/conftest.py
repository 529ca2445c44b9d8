"""Tiny Hugging Face models built from configs (random init, no downloads) and their closures."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    """A 2-layer OPT with tied input/output embeddings and dropout off, in eval mode."""
    torch.manual_seed(seed)
    config = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, ffn_dim=36, num_attention_heads=2,
                  max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, layerdrop=0.0)
    config.update(overrides)
    return OPTForCausalLM(OPTConfig(**config)).eval()


@pytest.fixture
def make_opt():
    return tiny_opt


@pytest.fixture
def opt_model():
    return tiny_opt()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    return {"input_ids": ids, "labels": ids}
