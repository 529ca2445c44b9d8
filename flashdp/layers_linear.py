"""DP Linear and GPT-2 Conv1D: per-sample clipping of weight+bias inside the layer's backward.

Forward is the layer's own computation. Backward, with output gradient G (B, T, out) and saved input
X (B, T, in) (any middle dims flattened into T):

1. ``grad_input = G W`` exactly as non-DP;
2. the clip group receives a :class:`LinearUse`; for a group used once this runs the dispatcher's path
   (``once``: per-sample tiles in cache-sized chunks; ``ghost``/``direct``: norms then one row-scaled
   GEMM), for a tied group it waits for the other uses (cross terms from Gram products).

The layer's ``weight``/``bias`` receive no autograd gradient: the clipped sum is added to ``.grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtrain.kernels.dp_clip_accumulate import accum_dtype, dp_clip_accumulate_
from memtrain.kernels.dp_clip_once import dp_clip_once_
from memtrain.kernels.dp_linear_norms import Gram, dp_linear_norms, ghost_is_cheaper, gram

from .dispatch import UNSET, choose_path, cuda_once_serves, log_choice
from .groups import Component, Use, grad_buffer
from .layers_common import LayerCall, autocast_inputs, layer_call, trainable
from .profiling import CLIP_ONCE, region
from .registry import register_layer

__all__ = ["DPConv1DMixin", "DPLinear", "DPLinearFunction", "LinearUse"]


# Layers reading the same input (q/k/v projections, gate/up) share X_b X_bᵀ in the ghost norm: the last two Gram
# matrices are cached for the backward pass (in the model's per-pass scratch, dropped when the pass ends), keyed
# by the input's storage, layout and version. Measured on the Llama-512 preset it removes 16% of the ghost-norm
# flops. Entries keep X alive, so its storage cannot be reused by another tensor while the key can match. Any
# device: on CUDA the ghost norms of these layers are cuBLAS Grams too (dp_linear_norms), and 2 x 64 MiB is small
# beside the activations the pass keeps.
_GRAM_CACHE_BYTES = 64 << 20


def _x_gram(X: Tensor, scratch: dict) -> Gram | None:
    """``gram(X)``, shared by the layers that read the same X in one backward pass; None past the size bound."""
    B, T, _ = X.shape
    if B * T * T * 4 > _GRAM_CACHE_BYTES:
        return None
    key = (X.data_ptr(), tuple(X.shape), tuple(X.stride()), X._version, X.dtype)
    cache = scratch.setdefault("x_gram", [])
    for k, _, g in cache:
        if k == key:
            return g
    g = gram(X)
    cache.append((key, X, g))
    del cache[:-2]
    return g


class LinearUse(Use):
    """One backward of a Linear-like layer: ``grad_W_b = G_bᵀX_b`` (``layout="out_in"``) or ``X_bᵀG_b``."""

    def __init__(self, G: Tensor, X: Tensor, weight: Tensor | None, bias: Tensor | None, layout: str,
                 call: LayerCall | None = None):
        self.G, self.X, self.weight, self.bias, self.layout = G, X, weight, bias, layout
        self.batch_size = G.shape[0]
        self.call = call

    def _describe(self) -> str:
        T, d_in, d_out = self._w_shape()
        return (f"{self.G.device.type}, T={T}, {d_out}x{d_in}, {self.G.dtype}, bias={self.bias is not None}, "
                f"layout={self.layout}")

    def _log(self, path: str, detail: str) -> None:
        if self.call is not None:
            log_choice(self.call.group.runtime.logged_paths, self.call.name, path, detail)

    def _w_shape(self) -> tuple[int, int, int]:
        return self.G.shape[1], self.X.shape[2], self.G.shape[2]

    def sq_norms(self, method: str | None = None) -> Tensor:
        if self.weight is not None:
            T, d_in, d_out = self._w_shape()
            if method is None:  # a use of a tied group: norms here, cross terms and the clip in the group
                method = "ghost" if ghost_is_cheaper(T, d_in, d_out) else "direct"
                self._log(method, f"{self._describe()}; tied group: {method} norms + Gram cross terms")
            xg = _x_gram(self.X, self.call.scratch()) if method == "ghost" and self.call is not None else None
            return dp_linear_norms(self.G, self.X, with_bias=self.bias is not None, method=method, x_gram=xg)
        return self.G.sum(1, dtype=accum_dtype(self.G.dtype)).square().sum(1)

    def accumulate(self, coef: Tensor) -> None:
        fresh = self.weight is not None and self.weight.grad is None
        if fresh:  # written, not added: no zero fill, no extra pass over the weight-sized gradient
            self.weight.grad = torch.empty_like(self.weight)
        gw = self.weight.grad if self.weight is not None else None
        gb = grad_buffer(self.bias) if self.bias is not None else None
        dp_clip_accumulate_(self.G, self.X, coef, gw, gb, layout=self.layout, overwrite=fresh)

    def components(self) -> list[Component]:
        out = []
        if self.weight is not None:
            left, right = (self.G, self.X) if self.layout == "out_in" else (self.X, self.G)
            out.append(Component(self.weight, "factored", left=left, right=right))
        if self.bias is not None:
            out.append(Component(self.bias, "dense", data=self.G.sum(1, dtype=accum_dtype(self.G.dtype))))
        return out

    def clip_and_accumulate(self, max_norm: float, scale: float) -> Tensor:
        if self.weight is None:
            return super().clip_and_accumulate(max_norm, scale)
        T, d_in, d_out = self._w_shape()
        dev = self.G.device.type
        once_ok = dev == "cuda" and cuda_once_serves(d_out, d_in, self.G.device, dtype=self.G.dtype,
                                                     has_bias=self.bias is not None, layout=self.layout)
        path = choose_path(dev, T, d_in, d_out, once_ok,
                           captured=self.call.forced_path if self.call is not None else UNSET)
        self._log(path, self._describe())
        if path == "once":
            gw = grad_buffer(self.weight)
            gb = grad_buffer(self.bias) if self.bias is not None else None
            with region(CLIP_ONCE):
                return dp_clip_once_(self.G, self.X, gw, gb, max_norm, scale, layout=self.layout)
        return self.norms_then_clip(lambda: self.sq_norms(method=path), max_norm, scale)


class DPLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``layout="out_in"``, nn.Linear) or ``y = x W + b`` (``"in_out"``, GPT-2 Conv1D)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, call: LayerCall, layout: str):
        xc, wc, bc = autocast_inputs(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            if layout == "out_in":
                y = F.linear(xc, wc, bc)
            else:
                y = torch.matmul(xc, wc)
                if bc is not None:
                    y = y + bc
        ctx.save_for_backward(xc, wc)
        ctx.call, ctx.layout = call, layout
        ctx.weight_p = weight if trainable(weight) else None
        ctx.bias_p = bias if trainable(bias) else None
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(w if ctx.layout == "out_in" else w.t()).to(ctx.x_dtype)
        if ctx.weight_p is not None or ctx.bias_p is not None:
            call = ctx.call
            G = call.flatten(grad_out)
            X = call.flatten(x)
            if X.dtype != G.dtype:
                X = X.to(G.dtype)
            call.add_use(LinearUse(G, X, ctx.weight_p, ctx.bias_p, ctx.layout, call))
        return grad_x, None, None, None, None


def _plain_forward(x: Tensor, weight: Tensor, bias: Tensor | None, layout: str) -> Tensor:
    if layout == "out_in":
        return F.linear(x, weight, bias)
    y = torch.matmul(x, weight)
    return y + bias if bias is not None else y


def _linear_forward(module: nn.Module, x: Tensor, layout: str) -> Tensor:
    call = layer_call(module, x, (module.weight, module.bias))
    if call is None:
        return _plain_forward(x, module.weight, module.bias, layout)
    return DPLinearFunction.apply(x, module.weight, module.bias, call, layout)


@register_layer(nn.Linear, description="ghost norms ⟨GGᵀ, XXᵀ⟩, direct per-sample tiles, or \"once\" (dispatcher); "
                "one GEMM over the B·T rows, scaling the narrower operand. Inputs 2-D, 3-D, 4-D…: middle dims are "
                "flattened into T")
class DPLinear(nn.Linear):
    """An ``nn.Linear`` whose backward clips each sample's weight+bias gradient (same parameters, same keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return _linear_forward(self, x, "out_in")


@register_layer("transformers.pytorch_utils.Conv1D", label="GPT-2 Conv1D (transformers)",
                description="as nn.Linear, with the weight laid out (in, out)")
class DPConv1DMixin:
    """Mixed into Hugging Face's GPT-2 ``Conv1D`` (``y = x W + b`` with W of shape (in, out))."""

    def forward(self, x: Tensor) -> Tensor:
        return _linear_forward(self, x, "in_out")
