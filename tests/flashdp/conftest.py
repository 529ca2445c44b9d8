"""Independent float64 reference for flashdp: a per-sample loop of single-sample backward passes.

Kept apart from the implementation on purpose: groups are derived here from the module structure
(a module's trainable parameters form a group; groups sharing a parameter merge), and each sample's
gradient is the gradient of the loss on that sample alone (the batch loss is a mean over samples).
"""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import flashdp

LLAMA_VOCAB = 50


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (RMSNorm, grouped-query attention, untied head) from a config, random init."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def make_llama():
    return tiny_llama


def reference_groups(model: nn.Module) -> list[list[str]]:
    """Clip groups as lists of parameter names (names as model.named_parameters() gives them)."""
    pname = {id(p): n for n, p in model.named_parameters()}
    groups: list[set[int]] = []
    for mod in model.modules():
        ids = {id(p) for p in mod._parameters.values() if p is not None and p.requires_grad}
        if not ids:
            continue
        merged = [g for g in groups if g & ids]
        for g in merged:
            groups.remove(g)
            ids |= g
        groups.append(ids)
    return [sorted(pname[i] for i in g) for g in groups]


def per_sample_clipped_sum(model: nn.Module, loss_fn, batch_size: int, max_grad_norm: float,
                           thresholds: dict[str, float] | None = None, dtype=torch.float64,
                           scale_by_batch: bool = False):
    """Σ_b clip(g_b) per group in ``dtype``; ``loss_fn(model, b)`` is the loss of sample b alone.

    Returns (sums by parameter name, per-sample per-group norms [B][G], group list).
    """
    ref = copy.deepcopy(model).to(dtype)
    groups = reference_groups(ref)
    params = dict(ref.named_parameters())
    L = len(groups)
    c_l = [max_grad_norm / math.sqrt(L)] * L
    if thresholds:
        for i, g in enumerate(groups):
            for n in g:
                mod = n.rsplit(".", 1)[0]
                if mod in thresholds:
                    c_l[i] = thresholds[mod]
    out = {n: torch.zeros_like(p) for n, p in params.items() if p.requires_grad}
    norms = []
    for b in range(batch_size):
        ref.zero_grad(set_to_none=False)
        for p in params.values():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        loss_fn(ref, b).backward()
        row = []
        for i, g in enumerate(groups):
            n = math.sqrt(sum(float(params[k].grad.pow(2).sum()) for k in g))
            row.append(n)
            c = min(1.0, c_l[i] / (n + 1e-6))
            for k in g:
                out[k] += c * params[k].grad
        norms.append(row)
    return out, norms, groups


def assert_grads_close(model: nn.Module, expected: dict[str, torch.Tensor], rtol=1e-4, atol=1e-6):
    """Compare every trainable p.grad with the reference; report all mismatches at once."""
    bad = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            bad.append(f"{n}: grad is None")
            continue
        e = expected[n].to(torch.float64)
        g = p.grad.to(torch.float64)
        err = (g - e).abs().max().item()
        tol = atol + rtol * e.abs().max().item()
        if not err <= tol:
            bad.append(f"{n}: max abs err {err:.3g} > tol {tol:.3g} (ref max {e.abs().max().item():.3g})")
    assert not bad, "\n".join(bad)


U32 = 2.0**-24


def check_against_loop(model, loss_fn, batch_loss, B, reduction="sum"):
    """make_private(model) with C_l the median per-sample group norm, one backward; compare with the loop.

    ``loss_fn(model, b)`` is sample b's own loss; ``batch_loss`` their sum (``reduction="sum"``) or mean."""
    _, norms, groups = per_sample_clipped_sum(model, loss_fn, B, float("inf"))
    flat = sorted(n for row in norms for n in row)
    c_l = flat[len(flat) // 2]
    C = c_l * len(groups) ** 0.5
    assert flat[0] < c_l < flat[-1], "the test should mix clipped and unclipped groups"
    want, _, _ = per_sample_clipped_sum(model, loss_fn, B, C)
    base, _, _ = per_sample_clipped_sum(model, loss_fn, B, C, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", flashdp.FallbackWarning)
        flashdp.make_private(model, C, loss_reduction=reduction)
    batch_loss(model).backward()
    for n, p in model.named_parameters():
        w = want[n]
        err32 = float((base[n].double() - w).abs().max())
        tol = 2 * err32 + 8 * U32 * float(w.abs().max()) + 1e-30
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        err = float((got.double() - w).abs().max())
        assert err <= tol, f"{n}: err {err:.3g} > tol {tol:.3g}"
    return C, groups


@pytest.fixture(scope="session")
def ref():
    return SimpleNamespace(per_sample_clipped_sum=per_sample_clipped_sum, groups=reference_groups,
                           assert_grads_close=assert_grads_close,
                           check_against_loop=check_against_loop)
