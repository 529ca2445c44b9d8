"""flashdp: DP-SGD with per-layer clipping fused into each layer's backward.

    model = flashdp.make_private(model, max_grad_norm=1.0)
    opt = flashdp.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                              noise_multiplier=1.0, expected_batch_size=32)
    loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
"""

from .accounting import PrivacyAccountant, get_noise_multiplier
from .data import poisson_loader
from .distributed import DistributedDataParallel
from .errors import FallbackWarning, FlashDPError, ModelChangedError, UnsupportedModuleError
from .fallback import fallback_bytes
from .groups import Component, Use
from .layers_common import LayerCall, layer_call
from .layers_embedding import DPEmbedding
from .layers_linear import DPLinear
from .layers_norm import DPLayerNorm, DPRMSNorm
from .optimizer import DPOptimizer
from .privatize import make_private, privacy_state
from .registry import register_layer

__all__ = [
    "CheckpointState",
    "Component",
    "DPEmbedding",
    "DPLayerNorm",
    "DPLinear",
    "DPOptimizer",
    "DPRMSNorm",
    "DPTrainer",
    "DPTrainingArguments",
    "DistributedDataParallel",
    "FallbackWarning",
    "FlashDPError",
    "LayerCall",
    "ModelChangedError",
    "PrivacyAccountant",
    "UnsupportedModuleError",
    "Use",
    "fallback_bytes",
    "get_noise_multiplier",
    "layer_call",
    "make_private",
    "poisson_loader",
    "privacy_state",
    "register_layer",
]

_LAZY = {"DPTrainer": "flashdp.trainer", "DPTrainingArguments": "flashdp.trainer",
         "CheckpointState": "flashdp.checkpoint"}


def __getattr__(name: str):
    """The Trainer integration (importing transformers' Trainer takes seconds), the torch.distributed.checkpoint
    state (not every torch build has torch.distributed) and ``flashdp.audit`` (scipy) are imported on first use."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "audit":
        return importlib.import_module("flashdp.audit")
    raise AttributeError(f"module 'flashdp' has no attribute {name!r}")
