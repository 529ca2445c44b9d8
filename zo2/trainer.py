"""ZOTrainer: ``transformers.Trainer`` whose training step is a zeroth-order ``ZOSGD`` step.

    args = zo2.ZOTrainingArguments(output_dir="out", learning_rate=1e-6, zo_eps=1e-3, max_steps=1000)
    trainer = zo2.ZOTrainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()

How it hooks into the Trainer (the least it overrides):

- ``create_optimizer`` builds ``ZOSGD`` over the trainable parameters (``args.learning_rate``,
  ``args.weight_decay``, ``args.zo_eps``, ``args.seed``; only parameters with ``requires_grad``, so a PEFT
  model trains its adapters alone) and, with ``args.zo_offload``, attaches ``zo2.offload``. The Trainer
  holds a :class:`ZOStepAdapter` that shares the ZOSGD's ``param_groups`` (the LR scheduler drives the ZO
  learning rate and steps every step, as with any optimizer) and whose own ``step()`` only checks that
  the ZO step was taken.
- ``training_step`` collects the micro-batches of a gradient-accumulation window and, on the last one,
  runs one ZO step over them: forward passes only, under ``no_grad``, model in eval mode (dropout off).
  No backward, no gradient clipping (``max_grad_norm`` defaults to 0 here; another value is refused).
- Gradient accumulation over k micro-batches is ``zo.step(accumulate=[one closure per micro-batch])``:
  k·q perturbation directions at the same θ, directions ``j·q .. j·q+q-1`` estimated on micro-batch j,
  averaged into one update. Each closure call runs the model once on one micro-batch (what the offload
  engine requires) and memory stays that of one micro-batch; the estimate is unbiased for the gradient
  of the mean loss over the k micro-batches.
- ``evaluate``, ``predict`` and ``_save`` flush pending updates first (``opt.flush()``), so they see the
  trained parameters when offloading defers an update.
- The logs carry ``projected_grad``, the last step's (L+ - L-) / 2ε (mean over its directions), in place
  of the Trainer's ``grad_norm`` (always 0 here: a ZO step leaves no ``.grad``).
- With ``zo_offload`` the model is not moved to the device by the Trainer or by accelerate: the engine
  places blocks itself.
- Under ``torchrun`` (world size > 1) ZOSGD gets ``process_group=True``: each rank runs its shard and the
  losses are averaged, so every rank applies the same update (all ranks need the same ``args.seed``).
- Private training (``dp_noise_multiplier`` or ``dp_target_epsilon`` set; docs/dpzo.md): the optimizer is
  ``zo2.DPZOSGD`` with ``dp_max_grad_norm``, an accountant (``dp_accountant``) and the Poisson sample rate
  ``q = per_device_train_batch_size / len(train_dataset)``; the training data come from flashdp's Poisson
  loader; each closure returns per-sample losses from the model's logits (``zo2.per_sample_lm_loss``, or
  ``dp_per_sample_loss(model, inputs)`` for another task); ε at ``dp_delta`` is logged with the loss.
  Gradient accumulation and several processes are refused (a Poisson batch is one logical step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from zo2.dp_optimizer import DPZOSGD
from zo2.optimizer import ZOSGD
from zo2.per_sample_loss import per_sample_lm_loss

__all__ = ["ZOStepAdapter", "ZOTrainer", "ZOTrainingArguments"]

logger = logging.getLogger(__name__)


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO options (``zo_*``); ``max_grad_norm`` defaults to 0 (no gradients)."""

    zo_eps: float = field(default=1e-3, metadata={"help": "ZO perturbation scale ε"})
    zo_num_perturbations: int = field(default=1, metadata={"help": "q directions per micro-batch"})
    zo_distribution: str = field(default="normal", metadata={"help": "'normal' or 'rademacher' directions"})
    zo_offload: dict | None = field(
        default=None, metadata={"help": "keyword arguments of zo2.offload (e.g. {'device': 'cuda', 'amp': 'bf16'}); "
                                        "None trains the model where it is"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "must stay 0: a ZO step has no gradient to clip"})
    dp_noise_multiplier: float | None = field(default=None, metadata={"help": "σ: train privately with DPZOSGD"})
    dp_target_epsilon: float | None = field(default=None, metadata={"help": "or calibrate σ for this ε at dp_delta"})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "C: bound on each sample's loss difference / 2ε"})
    dp_delta: float = field(default=1e-5, metadata={"help": "δ at which ε is reported"})
    dp_accountant: str = field(default="prv", metadata={"help": "'prv' or 'rdp' (Opacus's accountants)"})
    dp_clipping: str = field(default="joint", metadata={"help": "'joint' or 'aggregate' (DP-AggZO); docs/dpzo.md"})

    @property
    def private(self) -> bool:
        """Whether the run is private (a ``dp_noise_multiplier`` or a ``dp_target_epsilon`` is given)."""
        return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None

    @property
    def place_model_on_device(self) -> bool | None:
        """False with offloading: the engine, not the Trainer, decides where each block lives."""
        return False if self.zo_offload is not None else None


class ZOStepAdapter(torch.optim.Optimizer):
    """What the Trainer sees as its optimizer: the ZOSGD's param groups and state, a ``step()`` that checks.

    The ZO step itself runs in ``ZOTrainer.training_step`` (it needs the batch); the Trainer's later
    ``optimizer.step()`` call must find that step taken, otherwise something drove the adapter outside
    the Trainer's loop, which is an error rather than a silent no-op.
    """

    def __init__(self, zo: ZOSGD) -> None:
        self.zo = zo
        self.pending_steps = 0
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    # Read through, never cached: ZOSGD.load_state_dict (which accelerate calls when it prepares the
    # optimizer, and resuming calls) replaces the group dicts; the LR scheduler must edit the live ones.
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.zo.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.zo.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.zo.state

    @state.setter
    def state(self, value: Any) -> None:
        self.zo.state = value

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.zo.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.zo.defaults = value

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return self.zo.step(closure)
        if self.pending_steps < 1:
            raise RuntimeError("ZOStepAdapter.step() without a closure: no ZO step was taken by "
                               "ZOTrainer.training_step since the last call; call zo.step(closure) yourself "
                               "outside the Trainer")
        self.pending_steps -= 1
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: a ZO step makes no gradients."""

    def flush(self) -> None:
        self.zo.flush()

    def state_dict(self) -> dict:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.zo.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    """``transformers.Trainer`` driving ``zo2.ZOSGD`` (see the module docstring for the semantics).

    Pass ``ZOTrainingArguments`` (plain ``TrainingArguments`` get the zo defaults), or your own ``ZOSGD``
    through ``optimizers=(zo, scheduler_or_None)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:
            raise ValueError(f"ZOTrainer: max_grad_norm={self.args.max_grad_norm}, but a ZO step has no gradient to "
                             "clip; set max_grad_norm=0 (ZOTrainingArguments' default)")
        if self.args.n_gpu > 1:
            raise ValueError("ZOTrainer: torch.nn.DataParallel over several GPUs is not supported; launch one process "
                             "per GPU with torchrun (ZOSGD then averages the losses over ranks)")
        if self.zo_options["offload"] is not None:
            self.accelerator.device_placement = False  # accelerate.prepare would move the whole model otherwise
        if isinstance(self.optimizer, ZOSGD):
            self.optimizer = self._adapt(self.optimizer)
        self._micro_batches: list[dict[str, Any]] = []
        self.accountant = None
        if getattr(self.args, "private", False):
            self._check_private()

    # ----------------------------------------------------------------------------------------- privacy
    def _check_private(self) -> None:
        from flashdp.accounting import PrivacyAccountant

        a = self.args
        if a.dp_noise_multiplier is not None and a.dp_target_epsilon is not None:
            raise ValueError("ZOTrainer: give one of dp_noise_multiplier and dp_target_epsilon, not both")
        if a.gradient_accumulation_steps != 1:
            raise ValueError("ZOTrainer: private training needs gradient_accumulation_steps=1 (a Poisson batch is one "
                             "logical step); raise per_device_train_batch_size instead (a ZO step's memory is that "
                             "of inference)")
        if a.world_size > 1:
            raise ValueError("ZOTrainer: private training runs in one process here; for several ranks use "
                             "zo2.DPZOSGD(..., process_group=True) in your own loop (docs/dpzo.md)")
        if self.train_dataset is None:
            raise ValueError("ZOTrainer: private training needs a train_dataset (its size sets the sample rate)")
        self.accountant = PrivacyAccountant(a.dp_accountant)
        self.sample_rate = min(1.0, a.per_device_train_batch_size / len(self.train_dataset))

    @property
    def noise_multiplier(self) -> float:
        """σ: ``dp_noise_multiplier``, or calibrated to ``dp_target_epsilon`` over the planned steps (flashdp's
        calibration, Opacus's search)."""
        from flashdp.accounting import get_noise_multiplier

        a = self.args
        if a.dp_noise_multiplier is not None:
            return float(a.dp_noise_multiplier)
        steps = a.max_steps if a.max_steps and a.max_steps > 0 else math.ceil(a.num_train_epochs / self.sample_rate)
        key = (a.dp_target_epsilon, a.dp_delta, self.sample_rate, steps, a.dp_accountant)
        if getattr(self, "_calibrated", (None,))[0] != key:
            self._calibrated = (key, get_noise_multiplier(target_epsilon=a.dp_target_epsilon, target_delta=a.dp_delta,
                                                          sample_rate=self.sample_rate, steps=steps,
                                                          mechanism=a.dp_accountant))
        return self._calibrated[1]

    def epsilon(self) -> float:
        """ε spent so far at ``args.dp_delta`` (private runs only)."""
        if self.accountant is None:
            raise RuntimeError("ZOTrainer.epsilon: this run is not private (set dp_noise_multiplier or "
                               "dp_target_epsilon)")
        return self.accountant.epsilon(self.args.dp_delta)

    def dp_per_sample_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Per-sample losses (B,) of a causal LM: the logits of the inputs without labels, then
        :func:`zo2.per_sample_lm_loss`. Override for another task."""
        features = {k: v for k, v in inputs.items() if k != "labels"}
        return per_sample_lm_loss(model(**features).logits, inputs["labels"])

    # ----------------------------------------------------------------------------------------- options
    @property
    def zo_options(self) -> dict[str, Any]:
        a = self.args
        return {"eps": getattr(a, "zo_eps", 1e-3), "num_perturbations": getattr(a, "zo_num_perturbations", 1),
                "distribution": getattr(a, "zo_distribution", "normal"), "offload": getattr(a, "zo_offload", None)}

    @property
    def zo(self) -> ZOSGD:
        """The ZOSGD (the Trainer's ``self.optimizer`` is an adapter, possibly wrapped by accelerate)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, ZOStepAdapter):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("ZOTrainer: the optimizer is not created yet (it is built by train() or "
                               "create_optimizer())")
        return opt.zo

    def _adapt(self, zo: ZOSGD) -> ZOStepAdapter:
        if self.args.world_size > 1 and zo.process_group is None:
            zo.process_group = True
        offload = self.zo_options["offload"]
        if offload is not None and zo.offload_engine is None:
            from zo2.offload import offload as attach_offload

            attach_offload(self.model, zo, **offload)
        return ZOStepAdapter(zo)

    # --------------------------------------------------------------------------------- Trainer hooks
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build ``ZOSGD`` over the trainable parameters (an adapter around it, for the Trainer)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("ZOTrainer: the model has no trainable parameter (requires_grad=True)")
            o = self.zo_options
            if self.accountant is not None:
                a = self.args
                zo = DPZOSGD(params, lr=a.learning_rate, eps=o["eps"], weight_decay=a.weight_decay, seed=a.seed,
                             num_perturbations=o["num_perturbations"], distribution=o["distribution"],
                             max_grad_norm=a.dp_max_grad_norm, noise_multiplier=self.noise_multiplier,
                             expected_batch_size=a.per_device_train_batch_size, accountant=self.accountant,
                             sample_rate=self.sample_rate, clipping=a.dp_clipping)
            else:
                zo = ZOSGD(params, lr=self.args.learning_rate, eps=o["eps"], weight_decay=self.args.weight_decay,
                           seed=self.args.seed, num_perturbations=o["num_perturbations"],
                           distribution=o["distribution"])
            self.optimizer = self._adapt(zo)
        elif isinstance(self.optimizer, ZOSGD):
            self.optimizer = self._adapt(self.optimizer)
        elif not isinstance(self.optimizer, ZOStepAdapter):
            raise TypeError(f"ZOTrainer: the optimizer must be a zo2.ZOSGD, got {type(self.optimizer).__name__}")
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Collect micro-batches; on the last of an accumulation window take one ZO step over them."""
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)  # the window's mean loss is returned at its end
        batches, self._micro_batches = self._micro_batches, []
        model.eval()  # the two forward passes must see the same function: no dropout
        if self.accountant is not None:
            (b,) = batches
            loss = self.zo.step(self._private_closure(model, b))
            self._adapter().pending_steps += 1
            return loss.detach().to(self.args.device)
        # one closure per micro-batch: directions j·q .. j·q+q-1 are estimated on micro-batch j
        loss = self.zo.step(accumulate=[lambda b=b: self.compute_loss(model, b) for b in batches])
        self._adapter().pending_steps += 1
        return loss.detach().to(self.args.device)

    def _private_closure(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], torch.Tensor]:
        """The per-sample losses of ``inputs``; an empty Poisson batch gives an empty vector (noise only)."""
        labels = inputs.get("labels")
        if labels is not None and labels.shape[0] == 0:
            return lambda: torch.zeros(0)
        return lambda: self.dp_per_sample_loss(model, inputs)

    def get_train_dataloader(self) -> Any:
        """Private runs: flashdp's Poisson-sampled batches (``len``: one expected epoch); else the Trainer's."""
        if self.accountant is None:
            return super().get_train_dataloader()
        from flashdp.data import poisson_loader

        g = torch.Generator().manual_seed(self.args.seed)
        return poisson_loader(self.train_dataset, sample_rate=self.sample_rate, generator=g,
                              collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        """None: there is no ``.grad`` to measure (``log`` reports the projected gradient instead)."""
        return None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the last step's projected gradient to every training log entry (in a private run the released,
        noised one), and in private runs the privacy spent so far (``dp_epsilon`` at ``dp_delta``)."""
        if "loss" in logs and self.optimizer is not None:
            logs = {**logs, "projected_grad": self.zo.projected_grad}
        if self.accountant is not None and ("loss" in logs or "train_loss" in logs):
            logs = {**logs, "dp_epsilon": self.epsilon(), "dp_delta": self.args.dp_delta}
        super().log(logs, *args, **kwargs)

    def _adapter(self) -> ZOStepAdapter:
        opt = self.optimizer
        while not isinstance(opt, ZOStepAdapter):
            opt = opt.optimizer
        return opt

    def _flush(self) -> None:
        if self.optimizer is not None:
            self.zo.flush()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._flush()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._flush()
        return super().predict(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self._flush()
        super()._save(output_dir, state_dict)
