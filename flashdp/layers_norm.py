"""DP LayerNorm and RMSNorm (torch.nn.RMSNorm and Hugging Face Llama-style ``*RMSNorm``).

Per-sample gradients of the affine parameters are small ((B, d) each), so they are formed directly:
``gw_b = Σ_t G_b[t] ⊙ x̂_b[t]`` and ``gb_b = Σ_t G_b[t]``, with x̂ recomputed in backward from the saved
input. ``grad_input`` comes from the same ops as non-DP (torch's LayerNorm backward, or autograd over the
recomputed normalisation for RMSNorm). Hugging Face RMSNorm classes are accepted by duck typing (a
``weight`` and ``variance_epsilon``/``eps``) and verified numerically by ``make_private``: the module's
own forward must equal ``weight * normalize(x)`` (Gemma's ``(1 + weight)`` fails this and takes the generic
fallback, :mod:`flashdp.fallback`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtrain.kernels.dp_clip_accumulate import accum_dtype

from .fsdp import is_sharded
from .groups import Component, Use, grad_buffer
from .layers_common import LayerCall, layer_call, trainable
from .registry import register_layer

__all__ = ["DPHFRMSNormMixin", "DPLayerNorm", "DPRMSNorm", "NormUse", "hf_rms_normalize"]


class NormUse(Use):
    """Dense per-sample gradients of a norm layer's weight (and bias): (B, N) each."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]]):
        self.pairs = pairs  # [(parameter, per-sample grads (B, N) fp32)]
        self.batch_size = pairs[0][1].shape[0]

    def sq_norms(self) -> Tensor:
        return sum(g.square().sum(1) for _, g in self.pairs)

    def accumulate(self, coef: Tensor) -> None:
        for p, g in self.pairs:
            grad_buffer(p).add_((coef.to(g.dtype) @ g).view_as(p).to(p.dtype))

    def components(self) -> list[Component]:
        return [Component(p, "dense", data=g) for p, g in self.pairs]


def _rows(t: Tensor, n: int, B: int) -> Tensor:
    """(B, ..., *normalized) (or sample-major flattened rows) → (B, M, n), also for an empty batch."""
    return t.reshape(B, t.numel() // (B * n) if B * n else 0, n)


def _per_sample(G: Tensor, xhat: Tensor, n: int, B: int) -> Tensor:
    """Σ over all non-batch, non-normalised positions of G ⊙ x̂: (B, n) in fp32 (fp64 for float64 inputs)."""
    acc = accum_dtype(torch.promote_types(G.dtype, xhat.dtype))
    return _rows(G.to(acc) * xhat.to(acc), n, B).sum(1)  # the product needs fp32 under bf16: no dtype= here


class DPLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, call: LayerCall):
        ctx.params = [weight if trainable(weight) else None, bias if trainable(bias) else None]
        if torch.is_autocast_enabled(x.device.type):  # layer_norm runs in fp32 under autocast
            x, weight, bias = (t.float() if t is not None else None for t in (x, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.shape, ctx.call = shape, call
        return y

    @staticmethod
    def backward(ctx, G):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                G, x, ctx.shape, mean, rstd, weight, bias, [True, False, False])[0]
        n = math.prod(ctx.shape)
        B = ctx.call.batch_size
        pairs = []
        wp, bp = ctx.params
        if wp is not None:
            pairs.append((wp, _per_sample(G, (x - mean) * rstd, n, B)))
        if bp is not None:
            pairs.append((bp, _rows(G, n, B).sum(1, dtype=accum_dtype(G.dtype))))
        if pairs:
            ctx.call.add_use(NormUse(pairs))
        return grad_x, None, None, None, None, None


_NORM_DOC = "dense (B, d) per-sample gradients; clipped sum: `coefᵀ · per-sample`"


@register_layer(nn.LayerNorm, description=_NORM_DOC)
class DPLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` whose backward clips each sample's weight+bias gradient."""

    def forward(self, x: Tensor) -> Tensor:
        call = layer_call(self, x, (self.weight, self.bias), min_dim=len(self.normalized_shape) + 1)
        if call is None:
            return super().forward(x)
        return DPLayerNormFunction.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps, call)


def hf_rms_normalize(x: Tensor, eps: float) -> Tensor:
    """Hugging Face Llama/Qwen2/Mistral RMSNorm without its weight: fp32 maths, result in x's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


class DPRMSNormFunction(torch.autograd.Function):
    """``y = weight * x̂``, ``x̂ = x·r``, ``r = (mean(x²) + eps)^(-1/2)`` over the normalised dims, in fp32.

    ``kind="hf"``: Hugging Face's Llama-style maths (fp32, x̂ cast to x's dtype before the weight);
    ``kind="torch"``: ``F.rms_norm`` (eps None → the dtype's machine epsilon). Backward is analytic from the
    saved input and ``r`` (no recomputed forward): ``∂x = r·(g − x̂·mean(g ⊙ x̂))`` with ``g = G ⊙ weight``.
    """

    @staticmethod
    def forward(ctx, x, weight, shape, eps, kind, call: LayerCall):
        dims = tuple(range(-len(shape), 0))
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        compute = torch.float32 if kind == "hf" else accum_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(compute)
            r = torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
            if kind == "hf":
                y = weight * (h * r).to(x.dtype)
            else:
                y = F.rms_norm(x, shape, weight, eps)
        ctx.save_for_backward(x, weight, r)
        ctx.shape, ctx.dims, ctx.call = shape, dims, call
        ctx.weight_p = weight if trainable(weight) else None
        return y

    @staticmethod
    def backward(ctx, G):
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = G.to(r.dtype) * weight.to(r.dtype)
            grad_x = (r * (g - xhat * (g * xhat).mean(ctx.dims, keepdim=True))).to(x.dtype)
        if ctx.weight_p is not None:
            n = math.prod(ctx.shape)
            xh = xhat.to(x.dtype) if x.dtype != r.dtype else xhat  # the x̂ the weight multiplied
            ctx.call.add_use(NormUse([(ctx.weight_p, _per_sample(G, xh, n, ctx.call.batch_size))]))
        return grad_x, None, None, None, None, None


def _rms_dp_forward(module: nn.Module, x: Tensor, shape: tuple[int, ...], eps: float | None, kind: str,
                    plain) -> Tensor:
    call = layer_call(module, x, (module.weight,), min_dim=len(shape) + 1)
    if call is None:
        return plain(x)
    return DPRMSNormFunction.apply(x, module.weight, shape, eps, kind, call)


@register_layer(nn.RMSNorm, description=_NORM_DOC)
class DPRMSNorm(nn.RMSNorm):
    """A ``torch.nn.RMSNorm`` whose backward clips each sample's weight gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return _rms_dp_forward(self, x, tuple(self.normalized_shape), self.eps, "torch", super().forward)


def hf_rms_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", None)
    return getattr(module, "eps", None) if eps is None else eps


def _is_llama_rms_norm(module: nn.Module) -> bool:
    """A Hugging Face ``*RMSNorm`` computing ``weight * normalize(x)`` in fp32 (Llama, Qwen2, Mistral...).

    Duck-typed (a 1-d ``weight`` and ``variance_epsilon``/``eps``) and confirmed numerically on a random input:
    Gemma's ``(1 + weight) * normalize(x)`` fails the probe and takes the generic fallback.
    """
    w = getattr(module, "weight", None)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and hf_rms_eps(module) is not None):
        return False
    gen = torch.Generator(device=w.device).manual_seed(0) if w.device.type in ("cpu", "cuda") else None
    x = torch.randn(2, 3, w.shape[0], dtype=w.dtype, device=w.device, generator=gen)
    probe = module
    if is_sharded(w):  # FSDP2's sharded DTensor weight (make_private after fully_shard): probe a plain one
        w = torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=gen)
        probe = copy.copy(module)
        probe.__dict__["_parameters"] = {**module._parameters, "weight": w}
    with torch.no_grad():
        try:
            want = type(module).forward(probe, x)
            got = w * hf_rms_normalize(x, hf_rms_eps(module))
            return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-3)
        except Exception:  # a forward that cannot run on (2, 3, d) inputs is not Llama-style
            return False


@register_layer(_is_llama_rms_norm, label="Hugging Face Llama-style *RMSNorm (Llama, Qwen2, Mistral...)",
                description=_NORM_DOC + "; accepted when a numerical probe confirms `forward(x) == weight * "
                "normalize(x)` (Gemma's `(1 + weight)` takes the generic fallback)")
class DPHFRMSNormMixin:
    """Mixed into a Hugging Face Llama-style RMSNorm class (weight * normalize(x), fp32 maths)."""

    def forward(self, x: Tensor) -> Tensor:
        plain = super().forward  # type: ignore[misc]
        return _rms_dp_forward(self, x, (x.shape[-1],), hf_rms_eps(self), "hf", plain)
