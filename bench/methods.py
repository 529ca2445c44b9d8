"""What a benchmarked method is: a set-up function that takes a freshly built model and batch and returns a
step to time.

Each method module (``zo_methods``, ``dp_methods``) maps method names to set-up functions. A set-up may
raise :class:`MethodUnavailable` (the method cannot run in this build or on this model; the message says
why); the runner records that as the method's result and goes on with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class MethodUnavailable(RuntimeError):
    """This method cannot run here (missing feature, unsupported model); the message names the reason."""


@dataclass
class Workload:
    """A freshly built model and the token batch every method of a comparison trains on."""

    model: torch.nn.Module
    ids: torch.Tensor
    device: str
    trainable: str = "all"  # "all" or "linear" (only nn.Linear weights and biases train)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class Runner:
    """One method set up on a workload: ``step()`` runs one training step and returns the loss."""

    step: Callable[[], float]
    close: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A benchmarked method: its set-up and whether the model must be built on the host (offload)."""

    setup: Callable[[Workload], Runner]
    label: str
    host_model: bool = False


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
