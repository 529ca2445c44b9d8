"""memtrain.kernels: one module per operation (Triton kernel, launcher, C++/torch twins, dispatcher).

Installed as ``memtrain.kernels`` (never as a top-level ``kernels``, a name PyPI already uses). Import
the operation's module directly, e.g. ``from memtrain.kernels.zo_perturb import zo_perturb_``;
nothing here imports Triton or touches a device.
"""

__all__: list[str] = []
