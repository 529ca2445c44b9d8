"""ZOSGD: zeroth-order SGD with MeZO's two-point estimator and fused, counter-based noise passes.

One step with q directions z_k (Malladi et al., "Fine-Tuning Language Models with Just Forward
Passes", NeurIPS 2023), every pass below being one fused read-modify-write of the parameters:

1. θ ← θ + ε z_0
2. for k = 0 .. q-1:  L+_k = closure();  θ ← θ - 2ε z_k;  L-_k = closure();  g_k = (L+_k - L-_k) / 2ε;
   between directions, θ ← θ + ε z_k + ε z_{k+1} (restore and next perturbation in one pass)
3. θ ← θ + ε z_{q-1} - lr (Σ_k g_k z_k / q + wd θ)   (restore and update in one pass)

That is 2q + 1 passes (3 for q = 1; the textbook MeZO makes 4, drawing z afresh each time). z is
regenerated from (step seed, parameter stream id, index) and never stored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch

from zo2.checks import (
    check_hyperparameters,
    check_options,
    check_parameter,
    dropout_error,
    loss_value,
    record_active_dropout,
)
from zo2.distributed import average_losses, check_same_run
from zo2.noise import NoiseTarget, apply_terms, step_seed

Closure = Callable[[], torch.Tensor | float]

# Attributes beyond torch's optimizer state that define where a run is (kept by pickling and deepcopy).
RUN_ATTRIBUTES = ("seed", "num_perturbations", "distribution", "check_dropout", "step_count", "skipped_steps",
                  "projected_grad", "projected_grads")


class NonFiniteLossWarning(RuntimeWarning):
    """A step saw a NaN or infinite loss and was skipped."""


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO): ``p ← p - lr · (g · z + weight_decay · p)`` with ``g = (L+ - L-) / 2ε``.

    Args:
        params: parameters or param groups; each group may set its own ``lr``, ``eps``, ``weight_decay``.
        lr: learning rate (> 0).
        eps: perturbation scale ε (> 0).
        weight_decay: decoupled L2 decay (>= 0), applied as in MeZO: ``p ← p - lr · wd · p``.
        seed: base seed; with the step counter it determines every direction (resumable).
        num_perturbations: q, the number of directions averaged per step (2q forward passes).
        distribution: "normal" (Gaussian z) or "rademacher" (±1 z).
        check_dropout: refuse a step whose forward pass runs dropout in training mode.
        process_group: data parallelism (a ``torch.distributed`` group, or ``True`` for the default group):
            each rank runs the closure on its shard and the losses are averaged over the ranks before the
            update, so every rank (with the same ``seed``) applies the identical update.

    ``step(closure)`` runs ``closure`` (forward only, under ``torch.no_grad()``) 2q times and returns the
    mean loss at θ + εz_k. Afterwards ``projected_grad`` holds the mean of (L+_k - L-_k) / 2ε (with ε of
    the first group), ``projected_grads`` each direction's value, and the parameters their updated values.
    A NaN or infinite loss skips the step (parameters restored to θ up to the rounding of the passes
    already applied), warns with :class:`NonFiniteLossWarning` and counts it in ``skipped_steps``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        num_perturbations: int = 1,
        distribution: str = "normal",
        check_dropout: bool = True,
        process_group: object | None = None,
    ) -> None:
        check_hyperparameters(lr, eps, weight_decay)
        check_options(num_perturbations, distribution)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"ZOSGD: seed must be an int, got {type(seed).__name__}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.num_perturbations = num_perturbations
        self.distribution = distribution
        self.check_dropout = check_dropout
        self.process_group = process_group
        self.step_count = 0
        self.skipped_steps = 0
        self.projected_grad = 0.0
        self.projected_grads: list[float] = []
        for index, (p, _) in enumerate(self._unique_params()):
            check_parameter(p, index)

    # ------------------------------------------------------------------------------------ parameters
    def _unique_params(self) -> list[tuple[torch.Tensor, dict]]:
        """Each parameter once (a tied weight listed twice counts once), with its group, in group order:
        the position in this list is the parameter's stream id, stable across runs."""
        seen: set[int] = set()
        unique = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    unique.append((p, group))
        return unique

    def noise_targets(self) -> list[NoiseTarget]:
        """The trainable parameters with their stream ids and groups. A tied parameter appears once."""
        targets = []
        for stream, (p, group) in enumerate(self._unique_params()):
            if p.requires_grad:
                check_parameter(p, stream)
                targets.append(NoiseTarget(p, stream, group))
        return targets

    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            check_hyperparameters(group["lr"], group["eps"], group["weight_decay"], where=f"ZOSGD param group {i}",
                                  zero_lr_ok=True)

    # -------------------------------------------------------------------------------------- the step
    def seeds_for_step(self, step: int) -> list[int]:
        """The Philox keys of the q directions of step ``step`` (0-based)."""
        return [step_seed(self.seed, step, k) for k in range(self.num_perturbations)]

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step; returns the mean loss at θ + εz_k as a 0-d tensor."""
        if closure is None or not callable(closure):
            raise TypeError("ZOSGD.step needs a closure that runs the forward pass and returns the loss, "
                            "e.g. opt.step(lambda: model(**batch).loss)")
        self._check_ranks_agree()
        self._check_groups()
        engine = getattr(self, "offload_engine", None)
        if engine is not None:
            return engine.step(closure)
        targets = self.noise_targets()
        seeds = self.seeds_for_step(self.step_count)
        q = len(seeds)
        dist = self.distribution
        # What is currently added to θ, as (seed, multiple of ε): restoring applies the negation.
        applied: list[tuple[int, float]] = []

        def shift(terms: list[tuple[int, float]]) -> None:
            apply_terms(targets, [s for s, _ in terms], lambda g: [m * g["eps"] for _, m in terms], dist=dist)
            for seed, mult in terms:
                for i, (s, m) in enumerate(applied):
                    if s == seed:
                        applied[i] = (s, m + mult)
                        break
                else:
                    applied.append((seed, mult))
            applied[:] = [(s, m) for s, m in applied if m != 0.0]

        def restore() -> None:
            shift([(s, -m) for s, m in applied])

        losses_plus: list[float] = []
        diffs: list[float] = []
        try:
            shift([(seeds[0], 1.0)])
            for k in range(q):
                found: list[str] = []
                if self.check_dropout and k == 0:
                    with record_active_dropout(found):
                        loss_plus = loss_value(closure())
                    if found:
                        raise dropout_error(found)
                else:
                    loss_plus = loss_value(closure())
                (loss_plus,) = self.reduce_losses([loss_plus])
                losses_plus.append(loss_plus)
                if not math.isfinite(loss_plus):
                    return self._skip(restore, "L+", loss_plus, losses_plus)
                shift([(seeds[k], -2.0)])
                (loss_minus,) = self.reduce_losses([loss_value(closure())])
                if not math.isfinite(loss_minus):
                    return self._skip(restore, "L-", loss_minus, losses_plus)
                diffs.append((loss_plus - loss_minus) / 2.0)
                if k + 1 < q:
                    shift([(seeds[k], 1.0), (seeds[k + 1], 1.0)])
        except BaseException:
            restore()
            raise

        # Restore and update in one pass. Per group, g_k = diff_k / ε_group (see ZOSGD's docstring).
        def final_coefs(group: dict) -> list[float]:
            decay = 1.0 - group["lr"] * group["weight_decay"]
            coefs = [-group["lr"] * d / (group["eps"] * q) for d in diffs]
            coefs[-1] += group["eps"] * decay
            return coefs

        apply_terms(targets, seeds, final_coefs, lambda g: -g["lr"] * g["weight_decay"], dist=dist)
        return self._record_step(diffs, losses_plus)

    def _record_step(self, diffs: list[float], losses_plus: list[float]) -> torch.Tensor:
        """Count a completed step: its projected gradients (with ε of the first group) and the mean L+."""
        eps0 = self.param_groups[0]["eps"]
        self.projected_grads = [d / eps0 for d in diffs]
        self.projected_grad = sum(self.projected_grads) / len(diffs)
        self.step_count += 1
        return torch.tensor(sum(losses_plus) / len(losses_plus))

    def _check_ranks_agree(self) -> None:
        """Once per process (and after load_state_dict): all ranks must share seed, step, q and distribution."""
        pg = getattr(self, "process_group", None)
        if pg is None or getattr(self, "_ranks_checked", False):
            return
        check_same_run(self.seed, self.step_count, self.num_perturbations, self.distribution,
                       None if pg is True else pg)
        self._ranks_checked = True

    def reduce_losses(self, values: list[float]) -> list[float]:
        """The losses averaged over the data-parallel ranks in one all-reduce (themselves without a
        ``process_group``)."""
        pg = getattr(self, "process_group", None)  # not pickled: a process group does not survive a copy
        if pg is None:
            return values
        return average_losses(values, None if pg is True else pg)

    def _skip(self, restore: Callable[[], None], which: str, value: float, losses_plus: list[float]) -> torch.Tensor:
        """Count a skipped step (after ``restore`` undoes its perturbation) and warn."""
        restore()
        self.skipped_steps += 1
        self.projected_grad = float("nan")
        self.projected_grads = []
        warnings.warn(
            f"ZOSGD: step {self.step_count} saw a non-finite loss ({which} = {value}); the update was skipped and "
            f"the parameters restored ({self.skipped_steps} skipped so far). Check the data and the model's "
            "numerics (a lower eps or fp32 may help)",
            NonFiniteLossWarning,
            stacklevel=3,
        )
        self.step_count += 1
        return torch.tensor(losses_plus[-1] if losses_plus else float("nan"))

    def flush(self) -> None:
        """Make the parameters hold their trained values. Without offloading they always do when ``step``
        returns, so this does nothing; a ``zo2.offload`` engine applies its pending restore and update."""
        engine = getattr(self, "offload_engine", None)
        if engine is not None:
            engine.flush()

    # ------------------------------------------------------------------------------- serialisation
    def __getstate__(self) -> dict:
        state = super().__getstate__()  # torch keeps only defaults, state and param_groups
        state.update({name: getattr(self, name) for name in RUN_ATTRIBUTES})
        return state

    def state_dict(self) -> dict:
        """torch's optimizer state plus the ``zo2`` entry (base seed, step counter, q, distribution),
        so that a resumed run draws the same directions as an uninterrupted one. Flushes first."""
        self.flush()
        sd = super().state_dict()
        sd["zo2"] = {
            "seed": self.seed,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "num_perturbations": self.num_perturbations,
            "distribution": self.distribution,
            "projected_grad": self.projected_grad,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo2", None)
        if zo is None:
            raise KeyError("ZOSGD.load_state_dict: no 'zo2' entry; this state_dict was not saved by ZOSGD.state_dict()")
        check_options(zo["num_perturbations"], zo["distribution"])
        self.flush()
        super().load_state_dict(state_dict)
        self.seed = int(zo["seed"])
        self.step_count = int(zo["step"])
        self.skipped_steps = int(zo["skipped_steps"])
        self.num_perturbations = int(zo["num_perturbations"])
        self.distribution = str(zo["distribution"])
        self.projected_grad = float(zo["projected_grad"])
        self._ranks_checked = False
