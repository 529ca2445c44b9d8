"""zo2: zeroth-order fine-tuning (MeZO's estimator) with fused counter-based noise kernels.

``zo2.ZOSGD`` is a drop-in ``torch.optim.Optimizer`` whose ``step(closure)`` runs the closure twice per
direction (forward only) and updates the parameters in place; see :mod:`zo2.optimizer`.
``zo2.offload(model, opt)`` streams the model's transformer blocks through the device during those
steps; see :mod:`zo2.offload`, and ``zo2.plan_offload(model, ...)`` gives its memory plan from the
model's shapes alone (a meta-device model will do); ``zo2.empty_pretrained(path)`` builds a model whose
parameters ``offload`` fills from a local checkpoint one block at a time (:mod:`zo2.loading`).
``zo2.attach_fsdp(model, opt)`` runs the steps on a model sharded with FSDP2's ``fully_shard``; see
:mod:`zo2.sharding`. ``zo2.DPZOSGD`` is its differentially private sibling (per-sample losses, clipped and
noised loss differences); see :mod:`zo2.dp_optimizer`, and :mod:`zo2.dp_audit` for its one-run privacy audit.
"""

from zo2.dp_optimizer import DPZOSGD
from zo2.loading import empty_pretrained
from zo2.noise import step_seed
from zo2.offload import OffloadEngine, TraceEvent, offload
from zo2.optimizer import ZOSGD, NonFiniteLossWarning
from zo2.per_sample_loss import per_sample_lm_loss
from zo2.plan import OffloadPlan, plan_offload
from zo2.sharding import attach_fsdp

__all__ = ["DPZOSGD", "ZOSGD", "NonFiniteLossWarning", "OffloadEngine", "OffloadPlan", "TraceEvent", "ZOTrainer",
           "ZOTrainingArguments", "attach_fsdp", "empty_pretrained", "offload", "per_sample_lm_loss", "plan_offload",
           "step_seed"]

_LAZY = {"ZOTrainer": "zo2.trainer", "ZOTrainingArguments": "zo2.trainer"}


def __getattr__(name: str):
    """The Trainer integration (importing transformers' Trainer takes seconds) and ``zo2.dp_audit`` (scipy, flashdp's
    audit) are imported on first use."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "dp_audit":
        return importlib.import_module("zo2.dp_audit")
    raise AttributeError(f"module 'zo2' has no attribute {name!r}")
