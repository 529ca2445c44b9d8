"""flashdp under DistributedDataParallel: DDP sums the ranks' clipped sums, DPOptimizer adds noise once.

    model = flashdp.make_private(model, max_grad_norm=1.0)
    model = flashdp.DistributedDataParallel(model)          # torch's DDP with a summing all-reduce
    opt = flashdp.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                              noise_multiplier=1.0, expected_batch_size=global_expected_batch, seed=0)

Each rank clips its own samples inside its layers' backward (per-sample clipping needs nothing from the
other ranks); DDP's all-reduce, overlapped with the backward as usual, then sums (not averages) the
clipped sums, so after backward every rank holds Σ over the global batch. ``DPOptimizer.step`` sees that
DDP already reduced the gradients and skips its own all-reduce; rank 0's noise keys (from its seed) are
broadcast and every rank adds the same counter-based noise to its identical sums, so noise is added once
for the global batch. The sum is divided by ``expected_batch_size``, which must be the global expected
batch size (all ranks together).

Plain ``torch.nn.parallel.DistributedDataParallel`` also gives the right update (DDP averages, then
DPOptimizer's own all-reduce sums the averages), at the cost of a second all-reduce per step.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .privatize import privacy_state

__all__ = ["DistributedDataParallel", "sum_allreduce_hook"]


# No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.
def sum_allreduce_hook(process_group: dist.ProcessGroup | None,
                       bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce a gradient bucket with SUM and no division by the world size."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def DistributedDataParallel(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """Wrap a private model in torch's DDP whose all-reduce sums the ranks' clipped gradient sums.

    ``ddp_kwargs`` go to ``torch.nn.parallel.DistributedDataParallel`` (``device_ids``, ``process_group``, ...).
    """
    state = privacy_state(model)
    if state is None:
        raise ValueError("flashdp.DistributedDataParallel: call flashdp.make_private(model, ...) before wrapping "
                         "the model in DDP (the DP layers must be in place when DDP registers its hooks)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("flashdp.DistributedDataParallel: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group (torchrun sets the environment for it)")
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    ddp.register_comm_hook(ddp_kwargs.get("process_group"), sum_allreduce_hook)
    state.grads_summed_by_ddp = True
    return ddp
