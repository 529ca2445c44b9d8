"""zo2: zeroth-order fine-tuning (MeZO's estimator) with fused counter-based noise kernels."""

__all__: list[str] = []
