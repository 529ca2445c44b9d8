"""flashdp: DP-SGD with per-layer clipping fused into each layer's backward.

    model = flashdp.make_private(model, max_grad_norm=1.0)
    opt = flashdp.DPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                              noise_multiplier=1.0, expected_batch_size=32)
    loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
"""

from .errors import FlashDPError, ModelChangedError, UnsupportedModuleError
from .layers_embedding import DPEmbedding
from .layers_linear import DPLinear
from .layers_norm import DPLayerNorm, DPRMSNorm
from .privatize import make_private, privacy_state, register_layer

__all__ = [
    "DPEmbedding",
    "DPLayerNorm",
    "DPLinear",
    "DPRMSNorm",
    "FlashDPError",
    "ModelChangedError",
    "UnsupportedModuleError",
    "make_private",
    "privacy_state",
    "register_layer",
]
