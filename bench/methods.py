"""What a benchmarked method is: one definition holding its set-up, its step and its memory plan.

A :class:`Method` takes a freshly built model and batch (:class:`Workload`) and returns a :class:`Runner`
whose ``step()`` is timed; its ``plan`` predicts the method's peak memory from the model's shapes alone
(:mod:`memtrain.bench.planner`). The definitions are in ``zo_methods`` and ``dp_methods``, the name
lookup in ``catalogue``. A set-up may raise :class:`MethodUnavailable` (the method cannot run in this
build or on this model; the message says why); the runner records that and goes on with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .planner import Plan, PlanInput


class MethodUnavailable(RuntimeError):
    """This method cannot run here (missing feature, unsupported model); the message names the reason."""


@dataclass
class Workload:
    """A freshly built model and the token batch every method of a comparison trains on."""

    model: torch.nn.Module
    ids: torch.Tensor
    device: str
    trainable: str = "all"  # "all" or "linear" (only nn.Linear weights and biases train)
    options: dict = field(default_factory=dict)  # command options a method reads (zo: "prefetch")

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class Runner:
    """One method set up on a workload.

    ``step()`` runs one training step and returns the loss; ``close()`` releases what the set-up attached;
    ``info`` goes into the record as is; ``extra_timings`` are timed once per round after the steps, each
    a callable returning seconds (the offload engine's transfers alone, for one).
    """

    step: Callable[[], float]
    close: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)
    extra_timings: dict[str, Callable[[], float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its name and label, its set-up and its memory plan, together.

    ``plan`` maps the model's shapes and the run's sizes to the peak's parts in bytes; ``optimizer`` names
    the optimizer whose state they count; ``host`` maps them to the host memory an offloading method holds
    beside the device's (pinned, pageable). ``host_model``: the model is built on the host and the method
    moves what it needs to the device (offload).
    """

    name: str
    label: str
    setup: Callable[[Workload], Runner]
    plan: Callable[[PlanInput], dict[str, int]]
    host_model: bool = False
    optimizer: str = ""
    host: Callable[[PlanInput], dict[str, int]] | None = None

    def plan_for(self, inp: PlanInput) -> Plan:
        """The method's predicted peak memory for ``inp``, by part."""
        return Plan(self.name, self.plan(inp), self.optimizer, self.host(inp) if self.host is not None else {})


def freeze_all_but_linear(model: torch.nn.Module) -> None:
    """Leave only nn.Linear parameters trainable (what Opacus can clip on a Llama, whose RMSNorm it cannot)."""
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the batch (the same loss for every method of a comparison)."""
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
