"""Loading a Hugging Face checkpoint for offload without a full copy of the model in memory.

``zo2.empty_pretrained(path, torch_dtype)`` builds the model with its parameters on the meta device
(nothing allocated; buffers are real) and remembers the checkpoint's safetensors files. ``zo2.offload``
then fills the parameters from the files: those outside the blocks first (embeddings, final norm, head),
then the blocks one at a time, each read, converted to ``torch_dtype`` and moved into its host store
before the next is read. The host never holds the model twice, and a 16-bit checkpoint is converted to
fp32 (AMP's master) one block at a time. Each shard is opened for one block's tensors and closed again,
so the file's pages mapped by safetensors do not accumulate in the process's memory.

    model = zo2.empty_pretrained("path/to/checkpoint", torch_dtype=torch.float32)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-6)
    engine = zo2.offload(model, opt, device="cuda", amp="bf16")
"""

from __future__ import annotations

import json
import pathlib
import weakref
from collections import defaultdict

import torch
from torch import nn

_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its CheckpointSource


class CheckpointSource:
    """Where each tensor of a local safetensors checkpoint lives: name -> shard file."""

    def __init__(self, path: pathlib.Path, dtype: torch.dtype) -> None:
        self.path = path
        self.dtype = dtype
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / shard for name, shard in weight_map.items()}
        elif (path / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise FileNotFoundError(f"zo2.empty_pretrained: no model.safetensors or model.safetensors.index.json in "
                                    f"{path}; save the checkpoint with save_pretrained(safe_serialization=True)")

    def load(self, model: nn.Module, params: list[tuple[list[str], nn.Parameter]]) -> None:
        """Fill ``params`` (each with every name it has in ``model``, tied names included) from the files,
        converted to the source's dtype; each shard is opened once for them and closed after."""
        from safetensors import safe_open

        by_file: dict[pathlib.Path, list[tuple[str, nn.Parameter]]] = defaultdict(list)
        for names, p in params:
            key = next((n for n in names if n in self.files), None)
            if key is None:
                raise KeyError(f"zo2.offload: the checkpoint in {self.path} has no tensor for parameter "
                               f"{' / '.join(names)}; it does not match the model built from its config")
            by_file[self.files[key]].append((key, p))
        with torch.no_grad():
            for file, items in by_file.items():
                with safe_open(str(file), framework="pt") as f:
                    for key, p in items:
                        t = f.get_tensor(key)
                        if t.shape != p.shape:
                            raise ValueError(f"zo2.offload: checkpoint tensor {key} has shape {tuple(t.shape)}, the "
                                             f"model's parameter {tuple(p.shape)}")
                        value = t.to(self.dtype) if t.is_floating_point() else t
                        if p.is_meta:  # a meta tensor's data cannot be set: swap contents, keep the object
                            torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
                        else:
                            p.data = value


def empty_pretrained(path: str | pathlib.Path, torch_dtype: torch.dtype = torch.float32,
                     model_class: type | None = None) -> nn.Module:
    """A causal LM built from the config of the local checkpoint at ``path`` with its parameters on the meta
    device, to be filled block by block by :func:`zo2.offload` (see the module docstring).

    Args:
        path: a folder written by ``save_pretrained`` (config.json and safetensors shards).
        torch_dtype: the parameters' dtype once loaded: float32 for ``amp="bf16"/"fp16"`` (the fp32
            master), or the checkpoint's own dtype for ``amp=None``.
        model_class: default ``transformers.AutoModelForCausalLM``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = pathlib.Path(path)
    source = CheckpointSource(path, torch_dtype)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=torch_dtype)
    # a tied head is the embedding's Parameter, saved once under one of its names (tied outside the
    # context, whose parameter registration would make the head a new meta Parameter again)
    model.tie_weights()
    model.eval()
    for p in model.parameters():
        p._zo2_from_checkpoint = True  # gone once filled: swap_tensors swaps the attributes out with the meta data
    _SOURCES[model] = source
    return model


def from_checkpoint(p: torch.Tensor) -> bool:
    """Whether ``p`` is a meta parameter of a :func:`empty_pretrained` model, not filled yet."""
    return getattr(p, "_zo2_from_checkpoint", False)


def checkpoint_source(model: nn.Module) -> CheckpointSource | None:
    """The checkpoint that :func:`empty_pretrained` built ``model`` from, or None."""
    return _SOURCES.get(model)


def named_params(model: nn.Module, modules: list[nn.Module] | None = None, skip: set[int] | None = None
                 ) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter of ``model`` (of ``modules`` when given, minus ids in ``skip``) once, with all its names."""
    names: dict[int, list[str]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(n)
        params[id(p)] = p
    wanted = None if modules is None else {id(p) for m in modules for p in m.parameters()}
    return [(names[i], p) for i, p in params.items()
            if (wanted is None or i in wanted) and (skip is None or i not in skip)]
