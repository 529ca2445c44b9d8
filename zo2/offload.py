"""zo2.offload: stream a model's transformer blocks through the device during zeroth-order steps.

After ``zo2.offload(model, opt)`` the training loop is unchanged: ``loss = opt.step(closure)``. One step:

- the blocks are uploaded one after another into a ring of device buffers, ``prefetch`` blocks ahead
  of the one computing;
- the closure runs once per half (θ+εz_k and θ-εz_k, 2q halves), each on its own worker thread, in
  lock-step: every half passes through block i while it is resident (see :mod:`zo2.halves`);
- before the first half uses a block, one fused pass applies the previous step's restore and update
  and this step's +εz; between halves one pass flips it; after the last half the block is offloaded
  (left at θ-εz, its update deferred to the next step's pass, see :mod:`zo2.transitions`);
- the resident modules (embeddings, final norm, head) stay on the device and take the same passes
  when a half enters them.

So each block crosses the bus once per direction per step, and its parameters are read and written
twice per step. Anything that observes the model (a forward pass outside ``opt.step``,
``model.state_dict()``, ``opt.state_dict()``, ``opt.flush()``, ``engine.detach()``) first flushes: the
pending restore and update are applied and every parameter holds its trained value.

AMP (``amp="bf16"`` or ``"fp16"``): the host keeps an fp32 master of every block, the bus and the
compute carry a low-precision copy, and the update lands on the master on the host with the same z (the
C++ kernel), so updates far below a bf16 ulp accumulate. The low-precision device copy is discarded
after the step instead of being copied back, which halves the traffic.

The parts: :func:`zo2.plan.plan_offload` (the memory plan, from shapes alone), :mod:`zo2.precision`
(where a block's and a resident parameter's state lives: native dtype or fp32 host master),
:mod:`zo2.streamer` (the ring, its slots, the copies and the host-thread preparation) and
:mod:`zo2.engine` (the model's hooks, the lock-step halves and the step it runs for :class:`zo2.ZOSGD`).
"""

from __future__ import annotations

import torch
from torch import nn

from zo2.checks import refuse_compile_and_graphs
from zo2.engine import OffloadEngine, TraceEvent
from zo2.loading import checkpoint_source
from zo2.optimizer import ZOSGD
from zo2.plan import AMP_DTYPES
from zo2.streamer import check_host_threads

__all__ = ["OffloadEngine", "TraceEvent", "offload"]


def offload(model: nn.Module, opt: ZOSGD, device: str | torch.device = "cuda", amp: str | None = None, *,
            blocks: str | list[nn.Module] | None = None, prefetch: int = 1, trace: bool = False,
            verbose: bool = True, host_threads: int | None = None) -> OffloadEngine:
    """Stream ``model``'s transformer blocks through ``device`` during ``opt.step(closure)``.

    Args:
        model: a model on the CPU (e.g. a Hugging Face causal LM) in eval mode (dropout off), or one built
            by :func:`zo2.empty_pretrained` (parameters on the meta device, filled here from the
            checkpoint one block at a time).
        opt: the :class:`zo2.ZOSGD` built from ``model.parameters()``.
        device: where the compute runs; "cpu" runs the same engine and schedule without a GPU.
        amp: None (the parameters' dtype), "bf16" or "fp16" (fp32 master on the host, low-precision
            copy on the bus and in the compute).
        blocks: the block list (dotted path, ModuleList or list of modules); found automatically for
            OPT, Llama, Mistral, Qwen2, GPT-2, GPT-NeoX and MPT layouts.
        prefetch: blocks uploaded ahead of the computing one (the ring has prefetch + 1 slots).
        trace: record the schedule in ``engine.trace`` (a list of :class:`TraceEvent`).
        verbose: print the memory plan.
        host_threads: CPU threads of AMP's host pass (the fp32 master's update fused with the cast);
            None: on CUDA ``torch.get_num_threads() - 1`` (one core stays with the thread that launches
            the compute and the copies), on the CPU torch's count. Results do not depend on it.

    The closure must call the model exactly once (it runs once per half, 2q times per step). Returns
    the engine; ``engine.detach()`` turns the model back into a plain host model.
    """
    if not isinstance(opt, ZOSGD):
        raise TypeError(f"zo2.offload needs a zo2.ZOSGD optimizer, got {type(opt).__name__}")
    opt.check_unsharded("zo2.offload")
    if opt.offload_engine is not None:
        raise RuntimeError("zo2.offload: this optimizer is already attached to an offload engine; call "
                           "engine.detach() first")
    if not isinstance(model, nn.Module):
        raise TypeError(f"zo2.offload needs an nn.Module, got {type(model).__name__}")
    refuse_compile_and_graphs(model, "zo2.offload")
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"zo2.offload: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"zo2.offload: prefetch must be an int >= 0, got {prefetch!r}")
    check_host_threads(host_threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("zo2.offload: device='cuda' but CUDA is not available here; use device='cpu' to run "
                               "the same engine on the CPU, or plain ZOSGD")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"zo2.offload: device must be 'cpu' or 'cuda', got {device!r}")
    from_files = checkpoint_source(model) is not None  # zo2.empty_pretrained: meta parameters, filled here
    on_device = [n for n, p in model.named_parameters()
                 if p.device.type != "cpu" and not (from_files and p.device.type == "meta")]
    if on_device:
        raise ValueError(f"zo2.offload: parameters are already on {model.get_parameter(on_device[0]).device} "
                         f"({on_device[0]}, ...); load the model on the CPU: the engine moves the resident modules "
                         "itself and streams the blocks")
    if amp is not None:
        not_fp32 = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
        if not_fp32:
            raise TypeError(f"zo2.offload: amp={amp!r} keeps an fp32 master, but {not_fp32[0]} is "
                            f"{model.get_parameter(not_fp32[0]).dtype}; load the model in float32 "
                            "(torch_dtype=torch.float32)")
    engine = OffloadEngine(model, opt, dev, amp, blocks, prefetch, trace, verbose, host_threads)
    opt.attach_engine(engine)
    return engine
