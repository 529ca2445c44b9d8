"""Per-device memory at scale, on paper: flashdp and zo2 under DDP and FSDP2, and zo2's offloading.

``memtrain-bench plan --world-size N --shard {ddp,fsdp}`` prints these plans line by line; every line is
one term of docs/memory_plan.md, where the symbols are defined. ``--batch`` is the global batch: each of
the N ranks runs ceil(B/N) samples. The blocks are zo2's (``zo2.blocks.find_blocks``; one FSDP2 unit
each, the root holding embeddings, final norm and head), and zo2's offload plan is ``zo2.plan_offload``
on the meta-device model (:func:`memtrain.bench.planner.offload_parts`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from zo2.plan import hf_loss_bytes_per_logit

from .planner import Plan, PlanInput, offload_host, offload_parts, saved_activations

SCALE_MODELS = ["llama2-13b", "llama2-70b", "opt-30b", "opt-66b", "opt-175b"]
SHARDS = ("none", "ddp", "fsdp")
OPTIMIZER_STATE_BYTES = {"sgd": 0, "adamw": 8}  # s: bytes of optimizer state per parameter (AdamW: two fp32 moments)
ONCE_CHUNK_BYTES = 32 << 20  # flashdp's chunked per-sample path: samples per chunk fill at most this budget
# the terms of each plan that do not coexist with its peak (freed before the logits or activations peak)
TRANSIENT = {"flashdp": ("largest unit gathered", "its reduce-scatter", "per-sample workspace"),
             "zo2": ("blocks:", "one block's forward temporaries")}


def per_rank(i: PlanInput, world: int) -> PlanInput:
    """The plan input of one rank: ceil(B/N) of the global batch's samples."""
    return replace(i, batch=math.ceil(i.batch / world))


def linear_shapes(i: PlanInput) -> list[tuple[int, int]]:
    """(d_in, d_out) of a block's Linear layers and of the LM head."""
    h, f, kv = i.shape.hidden, i.shape.ffn, i.shape.kv
    return [(h, h), (h, kv), (h, f), (f, h), (h, i.shape.vocab)]


def flashdp_workspace(i: PlanInput) -> int:
    """W_dp(B'): the largest per-layer workspace of flashdp's per-sample clipping, by its dispatcher's rule:
    ghost norms (2·T² < d_in·d_out) hold two fp32 T×T Grams per sample; otherwise the per-sample path holds
    fp32 per-sample gradients, as many samples as fit in its 32 MiB chunk budget (at least one, at most B')."""
    B, T = i.batch, i.seq
    sizes = []
    for d_in, d_out in linear_shapes(i):
        if 2 * T * T < d_in * d_out:
            sizes.append(2 * B * T * T * 4)
        else:
            one = d_in * d_out * 4
            sizes.append(min(B, max(1, ONCE_CHUNK_BYTES // one)) * one)
    return max(sizes)


def logits_bytes(i: PlanInput) -> int:
    """A no-grad forward's loss: the logits (c bytes), their fp32 upcast when c < 4 (in fp32 they are the logits
    themselves) and the fp32 log-softmax: B·T·V·(c + 4 + 4·[c < 4])."""
    c = i.bytes
    return i.tokens * i.shape.vocab * (c + 4 + (4 if c < 4 else 0))


def block_temporaries(i: PlanInput) -> int:
    """Values alive inside one block's no-grad forward: the MLP's two F-wide and four H-wide tensors per token."""
    return i.tokens * (2 * i.shape.ffn + 4 * i.shape.hidden)


def _activations(i: PlanInput) -> int:
    """A(B'): what autograd saves for the backward pass, plus the logits and the loss's copy of them."""
    return saved_activations(i.shape, i.tokens) * i.bytes + 2 * i.tokens * i.shape.vocab * i.bytes


def _inner(optimizer: str, state_bytes: int) -> str:
    """The name of flashdp's inner optimizer and the state per parameter its plan counts."""
    return f"DPOptimizer({optimizer}): {state_bytes} bytes of state per parameter"


def flashdp_fsdp(i: PlanInput, world: int, state_bytes: int = 0, optimizer: str = "sgd") -> Plan:
    """flashdp under FSDP2, one unit per block and the root: per-rank memory."""
    s, b, r = i.shape, i.bytes, per_rank(i, world)
    root = s.params - s.in_blocks
    return Plan("flashdp FSDP2", optimizer=_inner(optimizer, state_bytes), components={
        "sharded params, grads, optimizer state  P/N·(b_p+b_g+s)": math.ceil(s.params / world) * (2 * b + state_bytes),
        "root unsharded (params + grads)  P_r·(b_p+b_g)": root * 2 * b,
        "largest unit gathered, double-buffered  2·P_u·b_p": 2 * s.block * b,
        "its reduce-scatter  2·P_u·b_g": 2 * s.block * b,
        "activations of the per-rank batch  A(B/N)": _activations(r),
        "per-sample workspace  W_dp(B/N)": flashdp_workspace(r),
        "noise (generated in place)": 0,
    })


def flashdp_ddp(i: PlanInput, world: int, state_bytes: int = 0, optimizer: str = "sgd") -> Plan:
    """flashdp under DDP: a full replica, its gradients and DDP's gradient buckets (a second copy of them)."""
    s, b, r = i.shape, i.bytes, per_rank(i, world)
    return Plan("flashdp DDP", optimizer=_inner(optimizer, state_bytes), components={
        "replica  P·b_p": i.weights,
        "gradients  P·b_g": s.trainable * b,
        "gradient buckets  P·b_g": s.trainable * b,
        "optimizer state  P·s": s.trainable * state_bytes,
        "activations of the per-rank batch  A(B/N)": _activations(r),
        "per-sample workspace  W_dp(B/N)": flashdp_workspace(r),
        "noise (generated in place)": 0,
    })


def zo2_fsdp(i: PlanInput, world: int) -> Plan:
    """zo2.ZOSGD over FSDP2 (zo2.attach_fsdp): shards, the gathered root and blocks, one forward's peak."""
    s, b, r = i.shape, i.bytes, per_rank(i, world)
    root = s.params - s.in_blocks
    return Plan("zo2 FSDP2", optimizer="ZOSGD: no state", components={
        "shards  ⌈P/W⌉·b": math.ceil(s.params / world) * b,
        "root gathered  R·c": root * b,
        "blocks: computing, next, all-gather buffer  3·B_blk·c": 3 * s.block * b,
        "one block's forward temporaries  B·T·(2·F+4·H)·c": block_temporaries(r) * b,
        "logits, fp32 upcast, log-softmax  B·T·V·(c+4+4·[c<4])": logits_bytes(r),
    })


def zo2_ddp(i: PlanInput, world: int) -> Plan:
    """zo2.ZOSGD with a replica per rank: the whole model and one forward's peak (no gradients, no state)."""
    r = per_rank(i, world)
    return Plan("zo2 DDP", optimizer="ZOSGD: no state", components={"replica  P·b": i.weights,
                            "one block's forward temporaries  B·T·(2·F+4·H)·c": block_temporaries(r) * i.bytes,
                            "logits, fp32 upcast, log-softmax  B·T·V·(c+4+4·[c<4])": logits_bytes(r)})


def zo2_offload_rank(i: PlanInput, world: int, amp: bool) -> Plan:
    """zo2.offload on each rank (data parallel; it does not combine with FSDP2): zo2.plan_offload's parts, with
    Hugging Face's loss like the other zo2 rows."""
    r = per_rank(i, world)
    parts = offload_parts(r, amp, hf_loss_bytes_per_logit)
    return Plan("zo2 offload" + (" + AMP" if amp else "") + " (per rank)", parts,
                optimizer="ZOSGD: no state", host=offload_host(r, amp))


def scale_plans(i: PlanInput, world: int, shard: str, optimizer: str = "sgd") -> list[Plan]:
    """The per-device plans of ``shard`` ("ddp" or "fsdp") over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    state = OPTIMIZER_STATE_BYTES[optimizer]
    if shard == "fsdp":
        plans = [flashdp_fsdp(i, world, state, optimizer), zo2_fsdp(i, world)]
    elif shard == "ddp":
        plans = [flashdp_ddp(i, world, state, optimizer), zo2_ddp(i, world)]
    else:
        raise ValueError(f"shard must be 'ddp' or 'fsdp' here, got {shard!r}")
    return [*plans, zo2_offload_rank(i, world, amp=False), zo2_offload_rank(i, world, amp=True)]
