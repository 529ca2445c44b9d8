"""A private training run's state for torch.distributed.checkpoint (DCP): sharded under FSDP2, exact on resume.

    import torch.distributed.checkpoint as dcp
    state = {"run": flashdp.CheckpointState(model, opt)}
    dcp.save(state, checkpoint_id=path)          # every rank writes its shards
    ...
    dcp.load(state, checkpoint_id=path)          # into a model built, sharded and made private the same way

What it holds:

- the model and the inner optimizer, through ``torch.distributed.checkpoint.state_dict.get_state_dict`` /
  ``set_state_dict`` (sharded DTensors under FSDP2, plain tensors otherwise; parameters named as in
  ``model.named_parameters()``, so a checkpoint loads whatever the number of ranks);
- ``DPOptimizer``'s own state (seed, step count, skipped steps): the whole noise state, so the resumed run
  draws the noise of the uninterrupted one;
- the accountant's history, when the optimizer has an accountant with ``state_dict``.

DCP's ``get_state_dict`` is given the inner optimizer, never the ``DPOptimizer``: for an optimizer without
state it runs a ``step()`` with zero gradients, which on the wrapper would add noise and count a step.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from .optimizer import DPOptimizer

__all__ = ["CheckpointState"]


class CheckpointState(Stateful):
    """What to hand to ``torch.distributed.checkpoint.save/load`` for a private model and its ``DPOptimizer``.

    Args:
        model: the private model (sharded with ``fully_shard`` or not).
        optimizer: its ``DPOptimizer``; the accountant passed to it is saved too.
    """

    def __init__(self, model: nn.Module, optimizer: DPOptimizer):
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"flashdp.CheckpointState: expected a flashdp.DPOptimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer.inner)
        sd = {"model": model_sd, "optim": optim_sd, "flashdp": self.optimizer.noise_state_dict()}
        accountant = self.optimizer.accountant
        if accountant is not None and hasattr(accountant, "state_dict"):
            sd["accountant"] = accountant.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer.inner, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])
        self.optimizer.share_inner_state()
        self.optimizer.load_noise_state_dict(state_dict["flashdp"])
        accountant = self.optimizer.accountant
        if "accountant" in state_dict:
            if accountant is None or not hasattr(accountant, "load_state_dict"):
                raise ValueError("flashdp.CheckpointState: the checkpoint holds an accountant's history but the "
                                 "DPOptimizer has no accountant to load it into; pass accountant= as in the saved run")
            accountant.load_state_dict(state_dict["accountant"])
