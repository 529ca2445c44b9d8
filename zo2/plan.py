"""The memory plan of an offloaded model: what stays on the device, the ring, the host store.

Peak device memory of a step = resident modules + ring + the activations of one block for every
half (2q of them) + the logits of each half. :func:`plan_offload` computes it from the model's shapes
and dtypes only, so it also plans a model built on the meta device (nothing allocated); ``zo2.offload``
prints the plan of the real model and checks it against the free device and host memory before
anything is moved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memtrain.memory import available_host_bytes
from zo2.blocks import check_block_ownership, find_blocks, tensors_bytes
from zo2.ring import staging_allocations, store_allocations, wire_layout
from zo2.staging import staging_slots

__all__ = ["AMP_DTYPES", "OffloadPlan", "available_host_bytes", "check_fits", "cublas_workspace_bytes",
           "hf_loss_bytes_per_logit", "plan_offload"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

GiB = 1024**3


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class OffloadPlan:
    """Byte counts of an offloaded model (``block_bytes``: the largest block as it crosses the bus)."""

    device: str
    amp: str | None
    num_blocks: int
    block_bytes: int
    ring_slots: int
    ring_bytes: int
    resident_bytes: int
    pinned_host_bytes: int
    pageable_host_bytes: int
    num_halves: int
    hidden_size: int | None = None
    vocab_size: int | None = None
    compute_itemsize: int = 4
    staging_slots: int = 0  # AMP: host slots of the low-precision copies in flight (zo2.staging)
    num_params: int = 0  # the model's parameters (each tied one once)
    workspace_bytes: int = 0  # CUDA: the cuBLAS workspaces of the threads that compute (cublas_workspace_bytes)

    @property
    def host_bytes_per_param(self) -> float:
        """Host bytes of the block stores and staging slots per model parameter."""
        return self.host_bytes / self.num_params if self.num_params else 0.0

    @property
    def host_bytes(self) -> int:
        """The block stores' and staging slots' host memory: pinned (what crosses the bus, on CUDA) +
        pageable."""
        return self.pinned_host_bytes + self.pageable_host_bytes

    @property
    def device_bytes(self) -> int:
        """Resident modules + ring + cuBLAS workspaces: the device memory held before any activation."""
        return self.resident_bytes + self.ring_bytes + self.workspace_bytes

    def activation_bytes(self, batch: int, seq_len: int, loss_bytes_per_logit: int | None = None) -> int:
        """One step's activations at its busiest moment: what every half holds between blocks, plus the
        larger of a block's working set and the loss's (one half's at a time: they never coexist).

        The halves take turns (:mod:`zo2.halves`): inside a block only the half holding the baton has
        temporaries (about 16 hidden-sized tensors: residual, attention and MLP intermediates), and a half
        computes its head and loss after its last block and hands the baton on only when its closure
        returns, so one half's logits exist at a time. Meanwhile each half holds up to 3 hidden-sized
        tensors: its hidden state and what the model's forward keeps from its prologue (OPT's decoder: the
        token and the position embeddings). ``loss_bytes_per_logit``: bytes the loss holds
        per logit (B·T·V of them) at its peak; default :func:`hf_loss_bytes_per_logit`, Hugging Face's
        causal-LM loss in the compute dtype."""
        if self.hidden_size is None:
            return 0
        c = self.compute_itemsize
        if loss_bytes_per_logit is None:
            loss_bytes_per_logit = hf_loss_bytes_per_logit(c)
        tokens = batch * seq_len
        hidden = tokens * self.hidden_size * c
        loss = tokens * (self.vocab_size or 0) * loss_bytes_per_logit
        return 3 * self.num_halves * hidden + max(16 * hidden, loss)

    def __str__(self) -> str:
        lines = [
            f"zo2.offload plan ({self.device}, amp={self.amp}, {self.num_halves} halves per step):",
            f"  resident on device     {_fmt(self.resident_bytes):>12}  (embeddings, final norm, head, buffers)",
            f"  ring on device         {_fmt(self.ring_bytes):>12}  "
            f"({self.ring_slots} slots x {_fmt(self.block_bytes)})",
            f"  host store             {_fmt(self.host_bytes):>12}  ({self.num_blocks} blocks"
            + (f", fp32 master + {self.staging_slots} staging slots in {self.amp}" if self.amp else "")
            + f"; pinned {_fmt(self.pinned_host_bytes)}, pageable {_fmt(self.pageable_host_bytes)})",
        ]
        if self.workspace_bytes:
            lines.append(f"  cuBLAS workspaces      {_fmt(self.workspace_bytes):>12}  "
                         f"({self.num_halves} half threads + the caller's)")
        if self.hidden_size is not None:
            lines.append(f"  + activations, e.g. B=1 T=2048: {_fmt(self.activation_bytes(1, 2048))}")
        return "\n".join(lines)


def hf_loss_bytes_per_logit(itemsize: int) -> int:
    """Bytes per logit that Hugging Face's causal-LM loss (``model(**batch, labels=labels).loss``) holds at
    its peak, for logits of ``itemsize`` bytes: the logits, their fp32 upcast (none when they are fp32) and
    the fp32 log-softmax."""
    return itemsize + (4 if itemsize != 4 else 0) + 4


def plan_offload(model: nn.Module, *, amp: str | None = None, prefetch: int = 1, num_perturbations: int = 1,
                 blocks: str | Sequence[nn.Module] | None = None, device: str | torch.device = "cuda",
                 trainable: Iterable[torch.Tensor] | None = None) -> OffloadPlan:
    """The memory plan of ``zo2.offload(model, opt, device, amp, blocks=blocks, prefetch=prefetch)``.

    Reads only shapes and dtypes, so ``model`` may live on the meta device. ``trainable``: the parameters
    the optimizer updates (default: those with ``requires_grad``); under AMP each trainable resident one
    keeps an fp32 master on the device beside its low-precision copy.

    Returns:
        The plan: ``resident_bytes`` (parameters outside the blocks in the compute dtype, AMP masters and
        every buffer), ``ring_bytes`` (``prefetch + 1`` slots of the largest block as it crosses the bus)
        and the block stores' host memory as allocated (:func:`zo2.ring.store_allocations`):
        ``pinned_host_bytes`` (on CUDA, what crosses the bus, page-rounded: natively the master, under
        AMP the ``prefetch + 2`` staging slots of the low-precision copies in flight, :mod:`zo2.staging`)
        and ``pageable_host_bytes`` (the fp32 master under AMP; everything on the CPU); ``host_bytes``
        is their sum.
    """
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"zo2.offload: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    amp_dtype = AMP_DTYPES[amp] if amp else None
    _, block_modules = find_blocks(model, blocks)
    check_block_ownership(model, block_modules)
    in_blocks = {id(p) for b in block_modules for p in b.parameters()}
    train = ({id(p) for p in model.parameters() if p.requires_grad} if trainable is None
             else {id(p) for p in trainable})
    wire_size = amp_dtype.itemsize if amp_dtype else None
    block_bytes = [wire_layout(list(b.parameters()), amp_dtype).nbytes for b in block_modules]
    residents = [p for p in model.parameters() if id(p) not in in_blocks]
    resident = sum(p.numel() * (wire_size or p.element_size()) for p in residents)
    if amp_dtype is not None:  # fp32 masters of the trainable resident parameters
        resident += sum(p.numel() * 4 for p in residents if id(p) in train)
    resident += tensors_bytes(list(model.buffers()))
    pin = torch.device(device).type == "cuda"
    allocations = [a for b in block_modules
                   for a in store_allocations(wire_layout(list(b.parameters()), None).nbytes,
                                              amp_dtype is not None, pin)]
    stages = staging_slots(prefetch) if amp_dtype is not None else 0
    allocations += staging_allocations(stages, max(block_bytes), pin)
    config = getattr(model, "config", None)
    slots = prefetch + 1
    # what the blocks compute in: the low-precision copy under AMP, else their floating parameters' dtype
    compute = wire_size or max((p.element_size() for b in block_modules for p in b.parameters()
                                if p.is_floating_point()), default=4)
    return OffloadPlan(
        device=str(torch.device(device)), amp=amp, num_blocks=len(block_modules), block_bytes=max(block_bytes),
        ring_slots=slots, ring_bytes=slots * max(block_bytes), resident_bytes=resident,
        pinned_host_bytes=sum(a.nbytes for a in allocations if a.pinned),
        pageable_host_bytes=sum(a.nbytes for a in allocations if not a.pinned),
        num_halves=2 * num_perturbations, hidden_size=getattr(config, "hidden_size", None),
        vocab_size=getattr(config, "vocab_size", None), compute_itemsize=compute, staging_slots=stages,
        num_params=sum(p.numel() for p in model.parameters()),
        workspace_bytes=(2 * num_perturbations + 1) * cublas_workspace_bytes(device) if pin else 0)


def cublas_workspace_bytes(device: str | torch.device) -> int:
    """Device memory torch's cuBLAS takes per computing thread (one handle per thread; its workspace, and the
    cuBLASLt one, come from the caching allocator and count as allocated memory).

    ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs) when set; otherwise NVIDIA's recommendation,
    32 MiB from Hopper on (compute capability 9, assumed unless CUDA is already initialized) and torch's
    4096 KiB x 2 + 16 KiB x 8 before it. The cuBLASLt workspace is counted at ``CUBLASLT_WORKSPACE_SIZE``
    KiB when set, else at the same size: an upper bound, as a plan that guards against running out of device
    memory should be."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        numbers = [int(x) for x in config.split(":") if x.strip().isdigit()]
        cublas = sum(size * count for size, count in zip(numbers[0::2], numbers[1::2], strict=False)) * 1024
    else:
        dev = torch.device(device)
        major = 9  # asked only of an initialized CUDA: planning must not create a context
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            major = torch.cuda.get_device_capability(dev.index if dev.index is not None else 0)[0]
        cublas = 32 * 2**20 if major >= 9 else (4096 * 2 + 16 * 8) * 1024
    lt = os.environ.get("CUBLASLT_WORKSPACE_SIZE")
    return cublas + (int(lt) * 1024 if lt and lt.strip().isdigit() else cublas)


def check_fits(plan: OffloadPlan, device: torch.device, extra_host_bytes: int) -> None:
    """Raise, printing the plan and what would fit, if the device or the host lacks the memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if plan.device_bytes > free:
            spare = free - plan.resident_bytes
            slots = max(spare // max(plan.block_bytes, 1), 0)
            fit = (f"a ring of {slots} slot(s) (prefetch={slots - 1}) would fit" if slots >= 1
                   else "even one slot does not fit beside the resident modules: free device memory or use amp='bf16'")
            raise MemoryError(f"zo2.offload: the plan needs {_fmt(plan.device_bytes)} on {device} but "
                              f"{_fmt(free)} is free; {fit}.\n{plan}")
    avail = available_host_bytes()
    if avail is not None and extra_host_bytes > avail:
        raise MemoryError(f"zo2.offload: the host store needs {_fmt(extra_host_bytes)} more host memory but "
                          f"{_fmt(avail)} is available; free host memory, or use amp=None (no fp32 master)."
                          f"\n{plan}")
