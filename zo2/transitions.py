"""The noise state machine of zeroth-order steps: every pass over a tensor is one transition.

A tensor set (ZOSGD's parameters, an offloaded block's device copy or host master, a resident
parameter) is at ``base + Σ_s applied[s]·ε·z(s)``, where ``base`` is θ before the update of ``record``'s
step. The passes of MeZO's step (Malladi et al., NeurIPS 2023) are transitions between such states:

- perturb: clean θ → ``{z_0: +1}`` (half 0 of a step);
- flip: ``{z_k: +1}`` → ``{z_k: -1}`` (half 2k+1);
- next direction: ``{z_k: -1}`` → ``{z_{k+1}: +1}`` (half 2k+2, restore and perturb in one pass);
- finish: a finished step's state → clean θ (restore and update), or straight to the next step's
  ``{z_0: +1}`` (ZO2's fusion of the update of step t into the perturbation of step t+1); a skipped or
  abandoned step restores without updating.

Each is one fused pass ``p ← p + c·p + Σ_s a_s z(s)`` with, when leaving a finished step,
``c = -lr·wd`` and ``a_s = -(1 + c)·applied[s]·ε - lr·g_s/q (+ target[s]·ε_new)``: MeZO's
``p ← p - lr·(g·z + wd·p)`` with the perturbation still on θ undone and the next one applied. Plain
ZOSGD walks a step's 2q halves and finishes to clean θ (2q + 1 passes); the offload engine defers the
finish of each tensor to its next pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zo2.noise import apply_pass

Pass = tuple[list[int], list[float], float]  # seeds, coefficients, decay c


@dataclass
class StepRecord:
    """One zeroth-order step: its directions, the hyperparameters per param group when it began, its
    noise distribution, and its half loss differences (L+_k - L-_k)/2 once known. A ``skipped`` step
    (non-finite loss, or abandoned after an error) restores without updating."""

    step: int
    seeds: list[int]
    hparams: list[tuple[float, float, float]]  # per param group: (lr, eps, weight_decay)
    dist: str = "normal"
    diffs: list[float] | None = None
    skipped: bool = False

    @property
    def finished(self) -> bool:
        return self.skipped or self.diffs is not None

    @property
    def num_halves(self) -> int:
        return 2 * len(self.seeds)

    def half_target(self, half: int) -> dict[int, float]:
        """The state of half ``half``: θ + εz_k for half 2k, θ - εz_k for half 2k+1."""
        return {self.seeds[half // 2]: 1.0 if half % 2 == 0 else -1.0}

    def discard(self) -> None:
        """Abandon the step (an error in it): every tensor is restored without an update."""
        if self.diffs is None:
            self.skipped = True


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
    """A tensor moved by the noise passes: its Philox stream id, its param group index, and the index of
    its first element in that stream (nonzero for a shard of a larger parameter)."""

    tensor: torch.Tensor
    stream: int
    group: int
    offset: int = 0
    cast: torch.Tensor | None = None  # AMP's host pass: the wire copy, filled in the same pass


def transition(state: NoiseState, record: StepRecord | None, target: dict[int, float], group: int) -> Pass:
    """The seeds, coefficients and decay of the one pass that takes a tensor of param group ``group``
    from ``state`` to ``target`` (multiples of ``record``'s ε; ``record=None`` means clean θ).

    Terms are ordered: the held step's seeds (its applied ones first within the step), then the new ones.
    """
    coefs: dict[int, float] = {}
    old = state.record
    if old is not None and old is record:  # within a step: perturb, flip or next direction
        eps = old.hparams[group][1]
        for s in [*state.applied, *(s for s in target if s not in state.applied)]:
            coefs[s] = (target.get(s, 0.0) - state.applied.get(s, 0.0)) * eps
        return list(coefs), list(coefs.values()), 0.0
    decay = 0.0
    if old is not None:  # leave the held step: restore, and update when it finished with its losses
        if not old.finished:
            raise RuntimeError(f"zo2: step {old.step} is still running; its state cannot be left before its losses "
                               "are known")
        lr, eps, wd = old.hparams[group]
        unknown = set(state.applied) - set(old.seeds)
        if unknown:
            raise RuntimeError(f"zo2: a tensor holds noise of seeds {sorted(unknown)} that step {old.step} never drew")
        if old.skipped:
            for s, m in state.applied.items():
                coefs[s] = -(1.0 + decay) * m * eps
        else:
            decay = -lr * wd
            q = len(old.seeds)
            for s, d in zip(old.seeds, old.diffs or [], strict=True):
                restore = -(1.0 + decay) * state.applied[s] * eps if s in state.applied else 0.0
                coefs[s] = restore - lr * d / (eps * q)
    if record is not None:
        eps_new = record.hparams[group][1]
        for s, m in target.items():
            coefs[s] = coefs.get(s, 0.0) + m * eps_new
    return list(coefs), list(coefs.values()), decay


def pass_dist(state: NoiseState, record: StepRecord | None) -> str:
    """The noise distribution of the pass from ``state`` to a state of ``record`` (one per fused pass)."""
    dists = {r.dist for r in (state.record, record) if r is not None}
    if len(dists) > 1:
        raise RuntimeError(f"zo2: cannot fuse passes of distributions {sorted(dists)}; flush before changing "
                           "the distribution")
    return dists.pop() if dists else "normal"


def move(targets: list[Target], state: NoiseState, record: StepRecord | None, target: dict[int, float]
         ) -> NoiseState:
    """Apply the pass from ``state`` to ``target`` to every tensor; returns the new state."""
    dist = pass_dist(state, record)
    passes: dict[int, Pass] = {}  # the coefficients depend only on the param group
    for t in targets:
        if t.group not in passes:
            passes[t.group] = transition(state, record, target, t.group)
        apply_pass(t.tensor, t.stream, *passes[t.group], dist, t.offset, t.cast)
    return NoiseState(record, dict(target)) if record is not None else NoiseState()
