"""Deferred restore and update: the noise state of a set of tensors, moved with one fused pass.

A tensor set (an offloaded block, or a resident parameter) is at ``base + Σ_s applied[s]·ε·z(s)``, where
``base`` is θ before the update of ``record``'s step. Once that step's losses are known, moving the set
to another state (the next step's ``+εz``, the flip ``-2εz``, or clean θ at a flush) restores, updates
and perturbs in a single pass of the fused kernel::

    p ← p + c·p + Σ_s a_s z(s),  c = -lr·wd,  a_s = -(1 + c)·applied[s]·ε - lr·g_s/q  (+ target[s]·ε)

which is MeZO's ``p ← p - lr·(g·z + wd·p)`` of the previous step fused with the next perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zo2.noise import apply_pass


@dataclass
class StepRecord:
    """One zeroth-order step: its directions, the hyperparameters per param group when it ran, and its
    half loss differences (L+_k - L-_k)/2 once known. ``skipped`` steps restore without updating."""

    step: int
    seeds: list[int]
    hparams: list[tuple[float, float, float]]  # per param group: (lr, eps, weight_decay)
    diffs: list[float] | None = None
    skipped: bool = False

    @property
    def finished(self) -> bool:
        return self.skipped or self.diffs is not None


@dataclass
class NoiseState:
    """Where a tensor set stands relative to θ: the step whose perturbation it holds and how much of it."""

    record: StepRecord | None = None
    applied: dict[int, float] = field(default_factory=dict)  # seed -> multiple of that step's ε

    @property
    def clean(self) -> bool:
        """True when the tensors hold θ with every update applied."""
        return self.record is None or (not self.applied and self.record.skipped)


@dataclass(frozen=True)
class Target:
    """A tensor moved by the noise passes, with its Philox stream id and its param group index."""

    tensor: torch.Tensor
    stream: int
    group: int


def transition(state: NoiseState, record: StepRecord | None, target: dict[int, float], group: int
               ) -> tuple[list[int], list[float], float]:
    """Seeds, coefficients and decay c of the one pass that takes a tensor of ``group`` from ``state``
    to ``target`` (multiples of ``record``'s ε; ``record=None`` means clean θ)."""
    coefs: dict[int, float] = {}
    decay = 0.0
    old = state.record
    if old is not None and old is record:
        for s in set(state.applied) | set(target):
            coefs[s] = (target.get(s, 0.0) - state.applied.get(s, 0.0)) * old.hparams[group][1]
        return list(coefs), list(coefs.values()), 0.0
    if old is not None:
        if not old.finished:
            raise RuntimeError(f"zo2: step {old.step} is still running; its state cannot be left before its losses "
                               "are known")
        lr, eps, wd = old.hparams[group]
        update = not old.skipped
        decay = -lr * wd if update else 0.0
        for s, m in state.applied.items():
            coefs[s] = -(1.0 + decay) * m * eps
        if update:
            q = len(old.seeds)
            for s, d in zip(old.seeds, old.diffs or [], strict=True):
                coefs[s] = coefs.get(s, 0.0) - lr * d / (eps * q)
    if record is not None:
        eps_new = record.hparams[group][1]
        for s, m in target.items():
            coefs[s] = coefs.get(s, 0.0) + m * eps_new
    return list(coefs), list(coefs.values()), decay


def move(targets: list[Target], state: NoiseState, record: StepRecord | None, target: dict[int, float],
         dist: str) -> NoiseState:
    """Apply the pass from ``state`` to ``target`` to every tensor; returns the new state."""
    for t in targets:
        apply_pass(t.tensor, t.stream, *transition(state, record, target, t.group), dist)
    return NoiseState(record, dict(target)) if record is not None else NoiseState()
