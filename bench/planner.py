"""Analytic memory plan: the peak each method needs for a model, batch and sequence length, without running.

Everything is read from the model's exact shapes (built on the meta device) and counted in bytes:

- ``weights``: parameters and buffers;
- ``gradients``: one per trainable parameter (first order and DP);
- ``optimizer state``: AdamW's two moments;
- ``activations``: what autograd saves for the backward pass, per token and block
  (OPT ≈ 10·hidden + 2·ffn values, Llama ≈ 9·hidden + 3·kv + 4·ffn), plus the embeddings' and the
  final norm's;
- ``logits``: the LM head's output, its shifted copy and the log-softmax (3·B·T·V values in the forward
  pass; in training the backward of the loss holds about as much again while the head's gradient appears);
- ``block transient``: one block's forward temporaries when nothing is saved (zeroth order);
- ``noise``: textbook MeZO's z and the two temporaries of ``p.data + scale·z·ε`` for the largest parameter;
  zo2 generates z inside its kernel and stores none; flashdp draws one parameter's noise at a time;
- ``per-sample gradients``: Opacus (hooks) stores B copies of every trainable weight's gradient (and the
  largest once more while clipping); Opacus ghost retains the loss's graph for its second backward pass;
- offload: zo2's own plan (``zo2.plan_offload`` on the meta-device model: ``resident``, ``offload ring``,
  the host store on a CPU device) and its estimate of a step's activations and logits.

The peak is the sum of what coexists at the busiest moment (the end of the forward pass and the start of
the backward pass for first-order methods). This module holds the shapes and the parts shared by several
methods; each method's own plan sits beside its set-up (``zo_methods``, ``dp_methods``). ``zo`` and ``dp``
runs print the plan beside what they measure; the coefficients were checked against measured CPU peaks
(tests/bench/test_planner.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .presets import meta_model

DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class Shape:
    """What the planner needs to know about a model, read from its meta-device twin."""

    family: str
    name: str  # the preset or checkpoint folder it was read from
    layers: int
    hidden: int
    ffn: int
    kv: int
    vocab: int
    params: int  # numel, each tied parameter once
    trainable: int
    largest: int  # numel of the largest trainable parameter
    block: int  # numel of the largest transformer block
    in_blocks: int  # numel of all blocks' parameters
    buffers: int


@functools.cache
def cached_meta_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """:func:`meta_model` in ``dtype``, built once per process (OPT-175B's takes seconds); do not modify it."""
    return meta_model(name).to(dtype)


def model_shape(name: str, trainable: str = "all") -> Shape:
    """Exact parameter counts of a preset or local checkpoint (built on the meta device); the blocks are the
    ones zo2's offload engine streams and FSDP2 shards one unit each (``zo2.blocks.find_blocks``)."""
    from zo2.blocks import find_blocks

    model = cached_meta_model(name)
    cfg = model.config
    params = list(model.parameters())
    if trainable == "linear":
        linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
        train = [p for p in params if id(p) in linear]
    else:
        train = params
    _, blocks = find_blocks(model)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Shape(
        family=cfg.model_type, name=name, layers=cfg.num_hidden_layers, hidden=hidden,
        ffn=getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", 4 * hidden),
        kv=hidden // heads * kv, vocab=cfg.vocab_size, params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in train), largest=max((p.numel() for p in train), default=0),
        block=max(block_sizes), in_blocks=sum(block_sizes), buffers=sum(b.numel() for b in model.buffers()),
    )


@dataclass
class Plan:
    """Predicted peak memory of one method, in bytes, with its parts (device memory; on a CPU run, the
    process's). ``optimizer`` names the optimizer whose state the parts count; ``host`` is the host memory
    an offloading method holds beside the device's (``pinned`` and ``pageable`` bytes), empty otherwise."""

    method: str
    components: dict[str, int] = field(default_factory=dict)
    optimizer: str = ""
    host: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_json(self) -> dict:
        out = {"method": self.method, "total_bytes": self.total, "components_bytes": dict(self.components),
               "optimizer": self.optimizer}
        if self.host:
            out["host_bytes"] = {**self.host, "total": sum(self.host.values())}
        return out


@dataclass(frozen=True)
class PlanInput:
    """What a method's plan is computed from: the model's shapes and the run's sizes."""

    shape: Shape
    batch: int
    seq: int
    dtype: torch.dtype = torch.float32
    device: str = "cuda"
    ring_slots: int = 2  # offload: prefetch + 1
    amp_bytes: int = 2  # offload with AMP: bytes per value of the low-precision copy

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def bytes(self) -> int:
        """Bytes per value of the parameters and activations."""
        return DTYPE_BYTES[self.dtype]

    @property
    def weights(self) -> int:
        return (self.shape.params + self.shape.buffers) * self.bytes


def saved_activations(s: Shape, tokens: int) -> int:
    """Values autograd saves for the backward pass (elements, not bytes)."""
    per_block = 9 * s.hidden + 3 * s.kv + 4 * s.ffn if s.family == "llama" else 10 * s.hidden + 2 * s.ffn
    return tokens * (s.layers * per_block + 4 * s.hidden)


def _forward_peak(s: Shape, tokens: int) -> int:
    """Elements alive at the worst moment of a no-grad forward pass: the loss, or one block's temporaries."""
    return max(3 * tokens * s.vocab, tokens * (2 * s.ffn + 4 * s.hidden))


def backward_parts(i: PlanInput) -> dict[str, int]:
    """A forward + backward step at its busiest moment: weights, saved activations, logits and the first
    gradient (the LM head's); optimizer state and method-specific parts are added by each method."""
    s, b, n = i.shape, i.bytes, i.tokens
    return {
        "weights": i.weights,
        "activations": saved_activations(s, n) * b,
        "logits and loss": 2 * n * s.vocab * b,
        "gradients (LM head, at the start of backward)": s.vocab * s.hidden * b,
    }


def forward_only_parts(i: PlanInput, noise_values: int = 0) -> dict[str, int]:
    """A step of no-grad forward passes: weights and the larger of the forward pass's peak and the noise's
    temporaries (``noise_values`` elements), which never coexist."""
    fwd = _forward_peak(i.shape, i.tokens) * i.bytes
    noise = noise_values * i.bytes
    if noise > fwd:
        return {"weights": i.weights, "activations (no grad)": 0, "noise": noise}
    return {"weights": i.weights, "activations (no grad)": fwd}


@functools.cache
def _offload_plan(name: str, dtype: torch.dtype, amp: bool, prefetch: int, device: str):
    """``zo2.plan_offload`` of a preset's meta-device model (cached: OPT-175B's takes seconds). Under AMP
    the model is the fp32 one whatever ``dtype``: ``zo2.offload`` keeps an fp32 master and refuses a
    16-bit model with AMP."""
    import zo2

    if amp:
        dtype = torch.float32

    # bf16 and fp16 copies have the same size: the plan's bytes do not depend on which one the engine picks
    return zo2.plan_offload(cached_meta_model(name, dtype), amp="bf16" if amp else None, prefetch=prefetch,
                            device=device)


def offload_host(i: PlanInput, amp: bool) -> dict[str, int]:
    """zo2.offload's host memory (``zo2.plan_offload``): ``pinned`` (what crosses the bus, page-locked on
    CUDA: natively the blocks' master, under AMP the staging slots) and ``pageable`` (the fp32 master
    under AMP)."""
    plan = _offload_plan(i.shape.name, i.dtype, amp, i.ring_slots - 1, i.device)
    return {"pinned": plan.pinned_host_bytes, "pageable": plan.pageable_host_bytes}


def lm_loss_bytes_per_logit(itemsize: int) -> int:
    """Bytes per logit the bench's loss (:func:`memtrain.bench.methods.lm_loss`) holds at its peak: the logits,
    their shifted copy (the reshape of a slice copies) and the log-softmax, all in the logits' dtype."""
    return 3 * itemsize


def offload_parts(i: PlanInput, amp: bool,
                  loss_bytes_per_logit: Callable[[int], int] = lm_loss_bytes_per_logit) -> dict[str, int]:
    """zo2.offload's peak, from zo2's own plan of the meta-device model (``zo2.plan_offload``): resident
    modules, the ring of block slots, a step's activations and logits; on CUDA the cuBLAS workspaces, on the CPU
    the host store.
    ``loss_bytes_per_logit`` maps the compute dtype's bytes to what the closure's loss holds per logit (default:
    the bench's loss; ``zo2.plan.hf_loss_bytes_per_logit`` for Hugging Face's)."""
    plan = _offload_plan(i.shape.name, i.dtype, amp, i.ring_slots - 1, i.device)
    parts = {
        "resident": plan.resident_bytes,
        "offload ring": plan.ring_bytes,
        "activations and logits (all halves)": plan.activation_bytes(
            i.batch, i.seq, loss_bytes_per_logit(plan.compute_itemsize)),
    }
    if plan.workspace_bytes:  # CUDA
        parts["cuBLAS workspaces"] = plan.workspace_bytes
    if i.device.startswith("cpu"):  # the host store (the blocks, and their low-precision copy) is the same memory
        parts["host store (blocks)"] = plan.host_bytes
    return parts
