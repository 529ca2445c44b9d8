"""Model presets: OPT and Llama shapes built from configs with random init (nothing is downloaded).

A preset is a family and the config fields that differ from the family's defaults. ``model_config``
turns a preset name, or the path of a local checkpoint folder, into a transformers config;
``build_model`` instantiates it (random init, or the checkpoint's weights for a path), and
``meta_model`` builds it on the meta device so that the planner can read exact parameter shapes of
OPT-175B without allocating a byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


@dataclass(frozen=True)
class Preset:
    family: str  # "opt" or "llama"
    fields: dict
    tiny: bool = False


def _opt(hidden: int, layers: int, heads: int, proj: int | None = None) -> Preset:
    return Preset("opt", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              ffn_dim=4 * hidden, word_embed_proj_dim=proj or hidden))


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int = 32000, **kw) -> Preset:
    return Preset("llama", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, **kw))


PRESETS: dict[str, Preset] = {
    # tiny: seconds per step on a laptop CPU, large enough that their memory stands out above the interpreter's
    "opt-tiny": Preset("opt", dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, ffn_dim=1024,
                                   word_embed_proj_dim=256, vocab_size=8192), tiny=True),
    "llama-tiny": Preset("llama", dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=704, vocab_size=8192), tiny=True),
    # the flashdp CPU preset (bench/RESULTS.md)
    "llama-6x512": _llama(512, 6, 8, 8, 1376),
    "opt-125m": _opt(768, 12, 12),
    # the synthetic offload model of ``memtrain-bench gpu-check`` (OPT-1.3B's width, 8 layers)
    "opt-2048x8": _opt(2048, 8, 32),
    "opt-350m": _opt(1024, 24, 16, proj=512),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "llama2-7b": _llama(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama(8192, 80, 64, 8, 28672),
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, vocab=128256, rope_theta=500000.0),
    "llama3-70b": _llama(8192, 80, 64, 8, 28672, vocab=128256, rope_theta=500000.0),
}

_FAMILY_DEFAULTS = {
    "opt": dict(vocab_size=50272, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, layerdrop=0.0),
    "llama": dict(max_position_embeddings=4096, attention_dropout=0.0, tie_word_embeddings=False),
}
_CLASSES = {"opt": (OPTConfig, OPTForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def model_config(name: str):
    """The transformers config of a preset, or of a local checkpoint folder (one holding ``config.json``)."""
    if name in PRESETS:
        preset = PRESETS[name]
        config_cls = _CLASSES[preset.family][0]
        config = config_cls(**{**_FAMILY_DEFAULTS[preset.family], **preset.fields})
    elif os.path.isdir(name):
        config = AutoConfig.from_pretrained(name)
    else:
        raise ValueError(f"unknown model {name!r}: give a preset ({', '.join(PRESETS)}) or a local checkpoint "
                         "folder that holds config.json")
    config._attn_implementation = "sdpa"
    return config


def family(config) -> str:
    """'opt', 'llama', or the config's model_type for other checkpoints."""
    return config.model_type


def build_model(name: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A fresh model: random init from the preset's config, or the weights of a local checkpoint."""
    torch.manual_seed(seed)
    if name not in PRESETS and os.path.isdir(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        return model.to(device)
    config = model_config(name)
    cls = _CLASSES[PRESETS[name].family][1]
    with torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype)


def meta_model(name: str) -> torch.nn.Module:
    """The model on the meta device: exact shapes, no storage (used by the planner)."""
    config = model_config(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
