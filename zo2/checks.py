"""Input checks for zeroth-order steps: hyperparameters, parameters, closure results, dropout.

Each error names the problem and the fix. The estimator (L+ - L-) / 2ε needs two forward passes of
the same deterministic function, so dropout left on in training mode is refused.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from memtrain.kernels.philox import DISTRIBUTIONS, SUPPORTED_DTYPES, is_dense
from zo2.loading import from_checkpoint

# Float attributes through which Hugging Face modules apply functional dropout while training.
FUNCTIONAL_DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "resid_pdrop")


def check_hyperparameters(lr: float, eps: float, weight_decay: float, where: str = "ZOSGD",
                          zero_lr_ok: bool = False) -> None:
    """``zero_lr_ok``: at step time a scheduler may set lr = 0 (the first step of a linear warm-up)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and (lr > 0 or (zero_lr_ok and lr == 0))):
        raise ValueError(f"{where}: lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: eps (the perturbation scale) must be a finite number > 0, got {eps!r}; "
                         "MeZO uses 1e-3")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")


def check_options(num_perturbations: int, distribution: str) -> None:
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
        raise ValueError(f"ZOSGD: num_perturbations must be an int >= 1, got {num_perturbations!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"ZOSGD: distribution must be one of {sorted(DISTRIBUTIONS)}, got {distribution!r}")


def check_parameter(p: torch.Tensor, index: int, allow_meta: bool = False) -> None:
    """Refuse a parameter the noise kernels cannot update in place (``allow_meta``: at construction, a meta
    parameter of a model built by :func:`zo2.empty_pretrained`, which ``zo2.offload`` fills from its
    checkpoint)."""
    where = f"ZOSGD: parameter {index} (shape {tuple(p.shape)})"
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; zo2 updates float32, float64, bfloat16 and float16 "
                        "parameters: convert the model (e.g. model.float()) or freeze it (requires_grad_(False))")
    if p.device.type not in ("cpu", "cuda") and not (allow_meta and p.is_meta and from_checkpoint(p)):
        raise ValueError(f"{where} is on {p.device}; zo2 runs on cpu and cuda: move the model there")
    if not is_dense(p):
        raise ValueError(f"{where} is a view with strides {p.stride()}; pass the tensor it views instead")


def loss_value(loss: object) -> float:
    """The closure's loss as a float, or an error saying what a closure must return."""
    if loss is None:
        raise TypeError("ZOSGD.step: the closure returned None; it must return the scalar loss "
                        "(e.g. `return model(**batch).loss`)")
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"ZOSGD.step: the closure returned a tensor of shape {tuple(loss.shape)}; it must "
                             "return a scalar loss: reduce it (e.g. loss.mean())")
        if loss.requires_grad:
            raise ValueError("ZOSGD.step: the closure's loss requires grad; zo2 runs the closure under "
                             "torch.no_grad() and needs no backward: remove torch.enable_grad() and "
                             "loss.backward() from the closure")
        return float(loss.detach().double().item())  # exact for fp32/bf16/fp16; keeps an fp64 loss whole
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"ZOSGD.step: the closure returned {type(loss).__name__}; it must return the scalar loss "
                    "as a tensor or a float")


def _dropout_rate(module: nn.Module) -> float:
    if not module.training:
        return 0.0
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p)
    rates = [getattr(module, a, None) for a in FUNCTIONAL_DROPOUT_ATTRS]
    return max((float(r) for r in rates if isinstance(r, float)), default=0.0)


def models_holding(params: Iterable[torch.Tensor]) -> list[weakref.ref]:
    """Weak references to the outermost live modules that hold any of ``params``.

    An optimizer sees parameters, not the model; the dropout check needs the model's modules *before* a
    step perturbs anything (a dropout module owns no parameter, so it is found from the holders' ancestors).
    Scans the live modules once; the caller caches the result."""
    ids = {id(p) for p in params}
    # type(), not isinstance(): isinstance may read __class__, which some module-level objects warn on
    modules = [m for m in gc.get_objects() if issubclass(type(m), nn.Module)]
    parents: dict[int, list[nn.Module]] = {}
    for m in modules:
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), []).append(m)
    roots: dict[int, nn.Module] = {}
    todo = [m for m in modules if any(id(p) in ids for p in m._parameters.values() if p is not None)]
    seen: set[int] = set()
    while todo:  # climb every chain of parents (a module may sit in several models, e.g. a PEFT wrapper)
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        up = parents.get(id(m), [])
        if not up:
            roots[id(m)] = m
        todo.extend(up)
    return [weakref.ref(m) for m in roots.values()]


def active_dropout(models: Iterable[nn.Module]) -> list[str]:
    """Descriptions of the modules of ``models`` that would run dropout > 0 in training mode (no forward)."""
    found: list[str] = []
    for model in models:
        for module in model.modules():
            rate = _dropout_rate(module)
            desc = f"{type(module).__name__} (p={rate:g})"
            if rate > 0 and desc not in found:
                found.append(desc)
    return found


@contextmanager
def record_active_dropout(found: list[str]):
    """While active, append a description of every module that runs with dropout > 0 in training mode."""

    def hook(module: nn.Module, args: tuple) -> None:
        rate = _dropout_rate(module)
        if rate > 0:
            desc = f"{type(module).__name__} (p={rate:g})"
            if desc not in found:
                found.append(desc)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def dropout_error(found: list[str]) -> ValueError:
    return ValueError(
        "ZOSGD.step: dropout is active in the model (" + ", ".join(found) + "). The two forward passes of a "
        "zeroth-order step must compute the same function: call model.eval() before training (zo2 needs no "
        "train mode) or set the dropout probabilities to 0; pass check_dropout=False to skip this check"
    )


def refuse_compile_and_graphs(model: nn.Module | None, where: str) -> None:
    """Refuse ``torch.compile`` and CUDA-graph capture around the offloaded step, with the fix.

    The engine swaps parameter storages between ring slots, runs the halves on worker threads and waits on
    copy-stream events from Python hooks: a compiled graph would bake in one slot's addresses and skip the
    hooks, and a captured graph would replay one step's copies and seeds forever.
    """
    compiled = model is not None and (type(model).__name__ == "OptimizedModule"
                                      or getattr(model, "_compiled_call_impl", None) is not None)
    if compiled or torch.compiler.is_compiling():
        raise RuntimeError(f"{where}: torch.compile is not supported with the offloaded step (the engine swaps "
                           "parameter storages and runs Python hooks between blocks); offload the uncompiled model, "
                           "and call opt.step outside compiled code")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{where}: CUDA graph capture is not supported with the offloaded step (each step "
                           "uploads blocks and draws new seeds); call opt.step outside torch.cuda.graph")
