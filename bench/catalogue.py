"""Every benchmarked method by name, the default set of each command, and the planner's entry point."""

from __future__ import annotations

import torch

from .dp_methods import DEFAULT_DP, DP_METHODS
from .methods import Method
from .planner import Plan, PlanInput, Shape
from .zo_methods import DEFAULT_ZO, ZO_METHODS

METHODS: dict[str, Method] = {**ZO_METHODS, **DP_METHODS}
# each measuring command: the methods it offers and its default selection
COMMANDS: dict[str, tuple[dict[str, Method], list[str]]] = {
    "zo": (ZO_METHODS, DEFAULT_ZO),
    "dp": (DP_METHODS, DEFAULT_DP),
}

# the commands that measure no method, with what they do (``memtrain-bench COMMAND --help``)
TOOLS: dict[str, str] = {
    "plan": "predicted peak memory per method, without running anything",
    "kernels": "run a kernel micro-benchmark: memtrain-bench kernels NAME [ARGS ...]",
    "model-sweep": "zo2 and flashdp against their definitions on every causal LM transformers builds tiny",
    "gpu-check": "the GPU verification: every GPU section in its own process, one JSON and a report (< 8 min)",
}


def plan_method(method: str, s: Shape, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                ring_slots: int = 2, amp_bytes: int = 2, device: str = "cuda") -> Plan:
    """The memory plan of ``method`` (any name in :data:`METHODS`) on ``device``. With offloading to the CPU,
    the host store (the blocks, and their low-precision copy under AMP) is in the same memory."""
    if method not in METHODS:
        raise ValueError(f"no memory plan for method {method!r}; methods: {', '.join(METHODS)}")
    return METHODS[method].plan_for(PlanInput(s, batch, seq, dtype, device, ring_slots, amp_bytes))
