"""ZOSGD: zeroth-order SGD with MeZO's two-point estimator and fused, counter-based noise passes.

One step with q directions z_k (Malladi et al., "Fine-Tuning Language Models with Just Forward
Passes", NeurIPS 2023), every pass below being one fused read-modify-write of the parameters and one
transition of :mod:`zo2.transitions`:

1. θ ← θ + ε z_0                                           (perturb)
2. for k = 0 .. q-1:  L+_k = closure();  θ ← θ - 2ε z_k;  L-_k = closure();  g_k = (L+_k - L-_k) / 2ε;
   between directions, θ ← θ + ε z_k + ε z_{k+1}           (flip; next direction)
3. θ ← θ + ε z_{q-1} - lr (Σ_k g_k z_k / q + wd θ)         (finish: restore and update)

That is 2q + 1 passes (3 for q = 1; the textbook MeZO makes 4, drawing z afresh each time). z is
regenerated from (step seed, parameter stream id, index) and never stored.

The step is split so that an engine can run it elsewhere (``zo2.offload``): :meth:`ZOSGD.begin_step`
makes the step's :class:`~zo2.transitions.StepRecord` (seeds, hyperparameters), the engine (or the
in-place loop here) runs the 2q halves and returns their losses, and :meth:`ZOSGD.finish_step` turns
them into the projected gradients, or skips the step on a non-finite loss. An engine is attached with
:meth:`ZOSGD.attach_engine` and implements :class:`StepEngine`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from memtrain.param_specs import check_param_specs, param_specs
from zo2.checks import (
    active_dropout,
    check_hyperparameters,
    check_options,
    check_parameter,
    dropout_error,
    loss_value,
    models_holding,
    record_active_dropout,
    refuse_compile_and_graphs,
)
from zo2.distributed import average_losses, check_same_run, resolve_group
from zo2.noise import step_seed
from zo2.sharding import OFFLOAD_AND_FSDP, FSDPSharding, is_sharded, local_shard
from zo2.transitions import NoiseState, StepRecord, Target, move

Closure = Callable[[], torch.Tensor | float]

# Attributes beyond torch's optimizer state that define where a run is (kept by pickling and deepcopy).
RUN_ATTRIBUTES = ("seed", "num_perturbations", "distribution", "check_dropout", "step_count", "skipped_steps",
                  "projected_grad", "projected_grads")


class NonFiniteLossWarning(RuntimeWarning):
    """A step saw a NaN or infinite loss and was skipped."""


class StepEngine(Protocol):
    """What :class:`ZOSGD` needs from an engine that runs its steps (``zo2.offload``'s engine)."""

    def run_halves(self, record: StepRecord, closures: Sequence[Closure], check_dropout: bool) -> list[object]:
        """Run the 2K halves of ``record`` (half h at its perturbation, calling ``closures[h // 2]``) and
        return what the closures returned in half order (the optimizer checks them), not reduced over ranks.
        On an error, leave every tensor restored (``record.discard()``) and raise. The update is applied once
        ``record`` is finished."""
        ...

    def flush(self) -> None:
        """Apply every pending restore and update: the parameters hold their trained values."""
        ...


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
        check_dropout: refuse a step whose forward pass runs dropout in training mode, before anything moves
            (the models holding the parameters are found once by a scan of the live modules).
        process_group: data parallelism (a ``torch.distributed`` group, a 1-D ``DeviceMesh``, or ``True`` for
            the default group): each rank runs the closure on its shard of the batch and the 2q losses are
            averaged over the ranks in one all-reduce per step, so every rank (with the same ``seed``) applies
            the identical update. For a model sharded with FSDP2, see :func:`zo2.attach_fsdp`.

    ``step(closure)`` runs ``closure`` (forward only, under ``torch.no_grad()``) 2q times and returns the
    mean loss at θ + εz_k. Afterwards ``projected_grad`` holds the mean of (L+_k - L-_k) / 2ε (with ε of
    the first group), ``projected_grads`` each direction's value, and the parameters their updated values.
    A NaN or infinite loss skips the step (parameters restored to θ up to the rounding of the passes
    already applied), warns with :class:`NonFiniteLossWarning` and counts it in ``skipped_steps``.
    ``step(accumulate=[c_0, ..., c_{k-1}])`` accumulates k micro-batches: k·q directions at the same θ,
    direction j·q + i estimated with ``c_j``, averaged into one update.
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
        self._engine: StepEngine | None = None
        self._sharding: FSDPSharding | None = None
        for index, (p, _) in enumerate(self.unique_params()):
            check_parameter(local_shard(p, f"parameter {index}")[0], index, allow_meta=True)  # checked again per step

    # ------------------------------------------------------------------------------------ parameters
    def unique_params(self) -> list[tuple[torch.Tensor, int]]:
        """Each parameter once (a tied weight listed twice counts once) with its param group index, in
        group order: the position in this list is the parameter's noise stream id, stable across runs."""
        seen: set[int] = set()
        unique = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    unique.append((p, index))
        return unique

    def targets(self) -> list[Target]:
        """The trainable parameters (``requires_grad``) as noise targets. A tied parameter appears once. A
        parameter sharded by FSDP2 is this rank's chunk at its offset in the unsharded parameter's stream."""
        targets = []
        for stream, (p, group) in enumerate(self.unique_params()):
            if p.requires_grad:
                local, offset = local_shard(p, f"parameter {stream}")
                check_parameter(local, stream)
                targets.append(Target(local, stream, group, offset))
        return targets

    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            check_hyperparameters(group["lr"], group["eps"], group["weight_decay"], where=f"ZOSGD param group {i}",
                                  zero_lr_ok=True)

    # ------------------------------------------------------------------------------ the engine seam
    @property
    def offload_engine(self) -> StepEngine | None:
        """The engine running the steps (set by ``zo2.offload``), or None: steps run in place."""
        return self._engine

    def attach_engine(self, engine: StepEngine) -> None:
        """Run the following steps through ``engine`` (``zo2.offload`` calls this)."""
        if self._engine is not None:
            raise RuntimeError("zo2.offload: this optimizer is already attached to an offload engine; call "
                               "engine.detach() first")
        self.check_unsharded("zo2.offload")
        self._engine = engine

    def check_unsharded(self, what: str) -> None:
        """Refuse ``what`` (the offload engine, which moves whole parameters) on a model sharded with FSDP2."""
        if self.sharding is not None or any(is_sharded(p) for p, _ in self.unique_params()):
            raise RuntimeError(f"{what}: the parameters are sharded by FSDP2 (fully_shard). {OFFLOAD_AND_FSDP}")

    @property
    def sharding(self) -> FSDPSharding | None:
        """The FSDP2 modules this optimizer reshards before each pass (set by :func:`zo2.attach_fsdp`), or None."""
        return getattr(self, "_sharding", None)

    def attach_sharding(self, sharding: FSDPSharding) -> None:
        """Reshard ``sharding``'s modules before every pass (:func:`zo2.attach_fsdp` calls this)."""
        if self._engine is not None:
            raise RuntimeError(f"zo2.attach_fsdp: this optimizer runs through zo2.offload. {OFFLOAD_AND_FSDP}")
        self._sharding = sharding

    def detach_engine(self) -> None:
        """Run the following steps in place again (the engine's ``detach()`` calls this after a flush)."""
        self._engine = None

    # ----------------------------------------------------------------------------- step accounting
    def seeds_for_step(self, step: int, num_directions: int | None = None) -> list[int]:
        """The Philox keys of the directions of step ``step`` (0-based): ``num_perturbations`` of them
        unless ``num_directions`` is given (k·q under accumulation)."""
        n = self.num_perturbations if num_directions is None else num_directions
        return [step_seed(self.seed, step, k) for k in range(n)]

    def begin_step(self, accumulation: int = 1) -> StepRecord:
        """The record of the next step: its ``accumulation · num_perturbations`` seeds and each group's
        (lr, eps, weight_decay) now. Changes nothing; :meth:`finish_step` counts the step."""
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"ZOSGD: accumulation must be an int >= 1, got {accumulation!r}")
        return StepRecord(self.step_count, self.seeds_for_step(self.step_count, accumulation * self.num_perturbations),
                          [(g["lr"], g["eps"], g["weight_decay"]) for g in self.param_groups], self.distribution)

    def finish_step(self, record: StepRecord, losses: Sequence[float],
                    like: tuple[torch.dtype, torch.device] | None = None) -> torch.Tensor:
        """Count the step of ``record`` from its losses (averaged over ranks, in half order L+_0, L-_0,
        L+_1, ...; the list may stop at the first non-finite one). Sets ``record.diffs`` and the projected
        gradients and returns the mean L+, or, for a non-finite loss, marks the record skipped, warns with
        :class:`NonFiniteLossWarning` and returns the L+ of the direction that failed, as a 0-d tensor of
        ``like``'s (dtype, device) (the closure's loss; torch's default dtype on the CPU without it). The
        parameters' restore and update follow the record (see :mod:`zo2.transitions`)."""
        where = {} if like is None else {"dtype": like[0], "device": like[1]}
        if record.finished or record.step != self.step_count:
            raise RuntimeError(f"ZOSGD.finish_step: the record of step {record.step} is not the running step "
                               f"{self.step_count} or was already finished")
        losses = list(losses)
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is None and len(losses) != record.num_halves:
            raise ValueError(f"ZOSGD.finish_step: step {record.step} has {record.num_halves} halves but "
                             f"{len(losses)} finite losses were given")
        plus = losses[0::2]
        self.step_count += 1
        if bad is not None:
            self.mark_skipped(record)
            warnings.warn(
                f"ZOSGD: step {record.step} saw a non-finite loss ({'L+' if bad % 2 == 0 else 'L-'} = {losses[bad]});"
                f" the update was skipped and the parameters restored ({self.skipped_steps} skipped so far). Check "
                "the data and the model's numerics (a lower eps or fp32 may help)",
                NonFiniteLossWarning,
                stacklevel=3,
            )
            return torch.tensor(plus[bad // 2], **where)
        record.diffs = [(p - m) / 2.0 for p, m in zip(plus, losses[1::2], strict=True)]
        eps0 = self.param_groups[0]["eps"]
        self.projected_grads = [d / eps0 for d in record.diffs]
        self.projected_grad = sum(self.projected_grads) / len(record.diffs)
        return torch.tensor(sum(plus) / len(plus), **where)

    def mark_skipped(self, record: StepRecord) -> None:
        """Count ``record``'s step as skipped: its finish pass restores without an update; no projected gradient."""
        record.skipped = True
        self.skipped_steps += 1
        self.projected_grad = float("nan")
        self.projected_grads = []

    def reduce_losses(self, values: list[float]) -> list[float]:
        """The losses averaged over the data-parallel ranks in one all-reduce (themselves without a
        ``process_group``)."""
        pg = getattr(self, "process_group", None)  # not pickled: a process group does not survive a copy
        if pg is None:
            return values
        return average_losses(values, resolve_group(pg))

    def _check_ranks_agree(self) -> None:
        """Once per process (and after load_state_dict): all ranks must share seed, step, q and distribution."""
        pg = getattr(self, "process_group", None)
        if pg is None or getattr(self, "_ranks_checked", False):
            return
        check_same_run(self.seed, self.step_count, self.num_perturbations, self.distribution, resolve_group(pg))
        self._ranks_checked = True

    # -------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             accumulate: Sequence[Closure] | None = None) -> torch.Tensor:
        """One zeroth-order step; returns the mean loss at θ + εz_k as a 0-d tensor.

        Args:
            closure: runs the forward pass and returns the scalar loss (called 2q times).
            accumulate: instead of ``closure``, one closure per micro-batch (k of them): the step takes
                k·q directions at the same θ, direction j·q + i estimated with ``accumulate[j]``, and
                averages them into one update. Each call runs one micro-batch, so memory is that of one.
        """
        closures = _closures(closure, accumulate)
        if self._engine is not None:
            refuse_compile_and_graphs(getattr(self._engine, "model", None), "ZOSGD.step")
        self._check_ranks_agree()
        self._check_groups()
        self._check_no_dropout()
        record = self.begin_step(len(closures))
        q = self.num_perturbations
        like: list[tuple[torch.dtype, torch.device]] = []  # the closure's loss: the step returns its kind
        per_direction = [_noting_kind(closures[d // q], like) for d in range(len(record.seeds))]
        if self._engine is not None:
            results = self._engine.run_halves(record, per_direction, self.check_dropout)
            try:
                losses = [self.half_loss(v) for v in results]
            except BaseException:
                record.discard()  # a bad closure result: restore without an update, now
                self._engine.flush()
                raise
            return self.finish_step(record, self.reduce_losses(losses), like[0] if like else None)
        return self._step_in_place(record, per_direction, like)

    def _check_no_dropout(self) -> None:
        """Refuse the step before anything moves if a model holding these parameters runs dropout.

        The models are found once (a scan of the live modules) and re-checked each step (``model.train()``
        may come later). A module outside them that the closure calls is still caught during the first
        forward pass; the parameters are then restored up to the rounding of one perturbation pass."""
        if not self.check_dropout:
            return
        params = self.unique_params()
        cached = getattr(self, "_dropout_scope", None)
        if cached is None or cached[0] != len(params):
            cached = self._dropout_scope = (len(params), models_holding(p for p, _ in params))
        found = active_dropout(m for m in (ref() for ref in cached[1]) if m is not None)
        if found:
            raise dropout_error(found)

    def _step_in_place(self, record: StepRecord, closures: list[Closure],
                       like: list[tuple[torch.dtype, torch.device]]) -> torch.Tensor:
        """The 2K halves on the parameters where they are, then the finish pass: 2K + 1 passes.

        Alone, a non-finite loss ends the step early. Across ranks every rank runs all 2K halves (a sharded
        model's forward is itself collective, so the ranks must call the closure equally often) and the
        losses are averaged in one all-reduce at the end."""
        targets = self.targets()
        sharding = self._sharding
        if sharding is None and any(is_sharded(p) for p, _ in self.unique_params()):
            raise RuntimeError("ZOSGD: the parameters are sharded by FSDP2 (fully_shard); call "
                               "zo2.attach_fsdp(model, opt) once before the first step, so that every forward "
                               "gathers the perturbed shards")
        reshard = sharding.reshard if sharding is not None else _nothing
        alone = getattr(self, "process_group", None) is None
        state = NoiseState()
        losses: list[float] = []
        try:
            for half in range(record.num_halves):
                reshard()  # no forward may reuse an unsharded copy from before this pass
                state = move(targets, state, record, record.half_target(half))
                found: list[str] = []
                if self.check_dropout and half == 0:
                    with record_active_dropout(found):
                        loss = self.half_loss(closures[0]())
                    if found:
                        raise dropout_error(found)
                else:
                    loss = self.half_loss(closures[half // 2]())
                losses.append(loss)
                if alone and not _finite(loss):
                    break
            losses = self.reduce_losses(losses)
        except BaseException:
            record.discard()
            if sharding is not None:
                sharding.recover()
            move(targets, state, None, {})
            raise
        result = self.finish_step(record, losses, like[0] if like else None)
        reshard()
        move(targets, state, None, {})  # restore and update (restore only for a skipped step)
        return result

    def half_loss(self, result: object) -> object:
        """What one half's closure returned, checked: the scalar loss as a float (DPZOSGD: per-sample losses)."""
        return loss_value(result)

    def flush(self) -> None:
        """Make the parameters hold their trained values. Without offloading they always do when ``step``
        returns, so this does nothing; a ``zo2.offload`` engine applies its pending restore and update."""
        if self._engine is not None:
            self._engine.flush()

    # ------------------------------------------------------------------------------- serialisation
    def __getstate__(self) -> dict:
        state = super().__getstate__()  # torch keeps only defaults, state and param_groups
        state.update({name: getattr(self, name) for name in RUN_ATTRIBUTES})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict: keep an attached engine
        self.__dict__.setdefault("_engine", None)  # a copy or an unpickled optimizer has no engine
        self.__dict__.setdefault("_sharding", None)  # nor FSDP modules

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
            "params": param_specs([p for p, _ in self.unique_params()]),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the run saved by :meth:`state_dict` (seed, step, directions); a state saved for other
        parameters (count, shapes, dtypes) is refused with the tensor that differs, before anything changes."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo2", None)
        if zo is None:
            raise KeyError("ZOSGD.load_state_dict: no 'zo2' entry; this state_dict was not saved by ZOSGD.state_dict()")
        check_options(zo["num_perturbations"], zo["distribution"])
        if "params" in zo:  # absent from states saved before the specs were recorded
            check_param_specs(zo["params"], [p for p, _ in self.unique_params()], "ZOSGD.load_state_dict")
        self.flush()
        super().load_state_dict(state_dict)
        self.seed = int(zo["seed"])
        self.step_count = int(zo["step"])
        self.skipped_steps = int(zo["skipped_steps"])
        self.num_perturbations = int(zo["num_perturbations"])
        self.distribution = str(zo["distribution"])
        self.projected_grad = float(zo["projected_grad"])
        self._ranks_checked = False


def _nothing() -> None:
    pass


def _finite(loss: float | torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else math.isfinite(loss)


def _closures(closure: Closure | None, accumulate: Sequence[Closure] | None) -> list[Closure]:
    """The step's closures, one per micro-batch, or an error saying what ``step`` takes."""
    if accumulate is None:
        if closure is None or not callable(closure):
            raise TypeError("ZOSGD.step needs a closure that runs the forward pass and returns the loss, "
                            "e.g. opt.step(lambda: model(**batch).loss)")
        return [closure]
    if closure is not None:
        raise TypeError("ZOSGD.step: pass either closure or accumulate (one closure per micro-batch), not both")
    closures = list(accumulate)
    if not closures or not all(callable(c) for c in closures):
        raise TypeError("ZOSGD.step: accumulate must be a non-empty sequence of closures, one per micro-batch, "
                        "e.g. accumulate=[lambda b=b: model(**b).loss for b in micro_batches]")
    return closures


def _noting_kind(closure: Closure, kinds: list[tuple[torch.dtype, torch.device]]) -> Closure:
    """``closure``, noting the (dtype, device) of the first tensor loss it returns into ``kinds`` (the
    step's result has it: a float64 model's loss is not rounded to float32)."""

    def noted() -> torch.Tensor | float:
        loss = closure()
        if not kinds and isinstance(loss, torch.Tensor):
            kinds.append((loss.dtype, loss.device))
        return loss

    return noted
