"""Find the transformer block list of a model, the unit that zo2.offload streams through the device.

Known Hugging Face layouts are tried first (their list may mix layer classes, as hybrid models such as
Jamba interleave attention and Mamba layers); otherwise the ``nn.ModuleList`` of at least two modules of
one class that holds the most parameters is taken. Everything outside the blocks (embeddings, final
norm, LM head) stays resident on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Dotted paths of the block list in Hugging Face causal LMs, most specific first.
KNOWN_BLOCK_PATHS = (
    "model.decoder.layers",  # OPT
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "transformer.h",  # GPT-2, GPT-J, Bloom (transformer.h)
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers around a causal LM
    "decoder.layers",  # a bare OPTModel
    "layers",  # a bare LlamaModel
    "h",  # a bare GPT2Model
)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_block_list(candidate: object, mixed: bool = False) -> bool:
    """A ModuleList of at least two modules holding parameters, all of one class unless ``mixed``."""
    return (isinstance(candidate, nn.ModuleList) and len(candidate) >= 2
            and (mixed or len({type(m) for m in candidate}) == 1) and _n_params(candidate) > 0)


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _no_blocks_error(model: nn.Module, detail: str) -> ValueError:
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    hint = f" (its nn.ModuleLists: {', '.join(lists[:8])})" if lists else ""
    return ValueError(f"zo2.offload: {detail} in {type(model).__name__}{hint}. Pass the block list explicitly, "
                      "e.g. zo2.offload(model, opt, blocks='model.layers') or blocks=model.model.layers")


def find_blocks(model: nn.Module, blocks: str | Sequence[nn.Module] | None = None) -> tuple[str, list[nn.Module]]:
    """The dotted path and the modules of the model's transformer blocks.

    ``blocks`` may be a dotted path, an ``nn.ModuleList`` or a list of submodules of ``model``.
    """
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError as exc:
            raise _no_blocks_error(model, f"blocks={blocks!r} is not a submodule") from exc
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise _no_blocks_error(model, f"blocks={blocks!r} is a {type(found).__name__}, not a non-empty ModuleList")
        return blocks, list(found)
    if blocks is not None:
        modules = list(blocks)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise _no_blocks_error(model, "blocks= must be a dotted path or a non-empty list of modules")
        paths = [_path_of(model, m) for m in modules]
        if any(p is None for p in paths):
            raise _no_blocks_error(model, "a module given in blocks= is not a submodule of the model")
        if len({id(m) for m in modules}) != len(modules):
            raise _no_blocks_error(model, "blocks= lists a module twice")
        return _path_of(model, blocks) if isinstance(blocks, nn.Module) else ",".join(paths), modules
    for path in KNOWN_BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if _is_block_list(found, mixed=True):  # hybrids (Jamba, OLMo-hybrid) mix layer classes
            return path, list(found)
    candidates = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    if not candidates:
        raise _no_blocks_error(model, "found no list of transformer blocks")
    name, best = max(candidates, key=lambda nm: _n_params(nm[1]))
    return name, list(best)


def check_block_ownership(model: nn.Module, block_modules: list[nn.Module]) -> None:
    """Refuse blocks that share a parameter with each other or with the resident modules: a block's
    parameters are streamed, so a tensor used elsewhere would not be on the device when needed."""
    owner: dict[int, str] = {}
    for i, block in enumerate(block_modules):
        for name, p in block.named_parameters():
            if id(p) in owner:
                raise ValueError(f"zo2.offload: parameter {name} of block {i} is shared with {owner[id(p)]}; "
                                 "blocks that share weights cannot be streamed one at a time: keep that model "
                                 "on the device (plain ZOSGD) or untie the weights")
            owner[id(p)] = f"block {i}"
    block_ids = {id(m) for block in block_modules for m in block.modules()}
    for name, module in model.named_modules():
        if id(module) in block_ids:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in owner:
                raise ValueError(f"zo2.offload: parameter {name}.{pname} is the same tensor as a parameter of "
                                 f"{owner[id(p)]}; a weight tied between a block and a resident module cannot "
                                 "be streamed: untie it or pass blocks= that excludes it")


def resident_modules(model: nn.Module, block_modules: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The modules outside the blocks (with their names), which stay on the device."""
    block_ids = {id(m) for block in block_modules for m in block.modules()}
    return [(name, m) for name, m in model.named_modules() if id(m) not in block_ids]


def tensors_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
