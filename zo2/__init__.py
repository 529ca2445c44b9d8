"""zo2: zeroth-order fine-tuning (MeZO's estimator) with fused counter-based noise kernels.

``zo2.ZOSGD`` is a drop-in ``torch.optim.Optimizer`` whose ``step(closure)`` runs the closure twice per
direction (forward only) and updates the parameters in place; see :mod:`zo2.optimizer`.
"""

from zo2.noise import step_seed
from zo2.optimizer import ZOSGD, NonFiniteLossWarning

__all__ = ["ZOSGD", "NonFiniteLossWarning", "step_seed"]
