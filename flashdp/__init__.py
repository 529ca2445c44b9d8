"""flashdp: DP-SGD with per-layer clipping fused into each layer's backward."""

__all__: list[str] = []
