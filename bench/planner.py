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
- offload: ``resident`` (parameters outside the blocks), ``offload ring`` (ring slots × the largest block in
  the compute dtype) and the activations of one block for both halves of the step.

The peak is the sum of what coexists at the busiest moment (the end of the forward pass and the start of
the backward pass for first-order methods). ``zo`` and ``dp`` runs print the plan beside what they measure;
the coefficients were checked against measured CPU peaks (tests/bench/test_planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .presets import meta_model

DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class Shape:
    """What the planner needs to know about a model, read from its meta-device twin."""

    family: str
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


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            return list(m)
    return []


def model_shape(name: str, trainable: str = "all") -> Shape:
    """Exact parameter counts of a preset or local checkpoint (built on the meta device)."""
    model = meta_model(name)
    cfg = model.config
    params = list(model.parameters())
    if trainable == "linear":
        linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
        train = [p for p in params if id(p) in linear]
    else:
        train = params
    blocks = _blocks(model)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return Shape(
        family=cfg.model_type, layers=cfg.num_hidden_layers, hidden=hidden,
        ffn=getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", 4 * hidden),
        kv=hidden // heads * kv, vocab=cfg.vocab_size, params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in train), largest=max((p.numel() for p in train), default=0),
        block=max(block_sizes), in_blocks=sum(block_sizes), buffers=sum(b.numel() for b in model.buffers()),
    )


@dataclass
class Plan:
    """Predicted peak memory of one method, in bytes, with its parts."""

    method: str
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_json(self) -> dict:
        return {"method": self.method, "total_bytes": self.total, "components_bytes": dict(self.components)}


def saved_activations(s: Shape, tokens: int) -> int:
    """Values autograd saves for the backward pass (elements, not bytes)."""
    per_block = 9 * s.hidden + 3 * s.kv + 4 * s.ffn if s.family == "llama" else 10 * s.hidden + 2 * s.ffn
    return tokens * (s.layers * per_block + 4 * s.hidden)


def _forward_peak(s: Shape, tokens: int) -> int:
    """Elements alive at the worst moment of a no-grad forward pass: the loss, or one block's temporaries."""
    return max(3 * tokens * s.vocab, tokens * (2 * s.ffn + 4 * s.hidden))


def plan_method(method: str, s: Shape, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                ring_slots: int = 2, amp_bytes: int = 2, device: str = "cuda") -> Plan:
    """The memory plan of ``method`` ('adamw', 'sgd', 'mezo', 'zo2', 'forward', 'zo2-offload',
    'zo2-offload-amp', 'nondp', 'flashdp', 'opacus', 'opacus-ghost') on ``device``. With offloading to
    the CPU, the host store (the blocks, and their low-precision copy under AMP) is in the same memory."""
    b = DTYPE_BYTES[dtype]
    n = batch * seq
    weights = (s.params + s.buffers) * b
    plan = Plan(method)
    c = plan.components
    if method in ("zo2", "forward", "mezo"):
        c["weights"] = weights
        fwd = _forward_peak(s, n) * b
        noise = 3 * s.largest * b if method == "mezo" else 0
        # the noise temporaries of MeZO and the forward pass never coexist: the peak is the larger one
        c["activations (no grad)"] = max(fwd, noise) if method == "mezo" else fwd
        if method == "mezo" and noise > fwd:
            c["noise"], c["activations (no grad)"] = noise, 0
    elif method in ("zo2-offload", "zo2-offload-amp"):
        cb = amp_bytes if method.endswith("amp") else b
        c["resident"] = (s.params - s.in_blocks + s.buffers) * b
        c["offload ring"] = ring_slots * s.block * cb
        c["activations (one block, both halves)"] = 2 * n * s.hidden * 4 * cb
        c["logits"] = 3 * n * s.vocab * cb
        if device.startswith("cpu"):
            c["host store (blocks)"] = s.in_blocks * (b + (cb if method.endswith("amp") else 0))
    elif method in ("adamw", "sgd", "nondp", "flashdp", "opacus", "opacus-ghost"):
        c["weights"] = weights
        c["activations"] = saved_activations(s, n) * b
        c["logits and loss"] = 2 * n * s.vocab * b
        c["gradients (LM head, at the start of backward)"] = s.vocab * s.hidden * b
        if method == "adamw":
            c["optimizer state"] = 2 * s.trainable * b
            c["update temporaries"] = s.largest * b
        if method == "flashdp":
            c["noise"] = s.largest * b
        if method == "opacus":
            # B gradients per trainable weight, and the largest one again while it is clipped
            c["per-sample gradients"] = batch * (s.trainable + s.largest) * b
        if method == "opacus-ghost":
            # the loss's graph is retained for the second, rescaled backward pass
            c["retained loss graph"] = 3 * n * s.vocab * b
    else:
        raise ValueError(f"no memory plan for method {method!r}")
    return plan
