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


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2 ties its LM head to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=24, n_layer=3, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)).eval()


MODEL_BUILDERS = {"opt": tiny_opt, "llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def model_name(request):
    return request.param


@pytest.fixture
def builders():
    """Builders of tiny causal LMs by name (random init, dropout off, eval mode)."""
    return MODEL_BUILDERS
