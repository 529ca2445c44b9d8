"""DPTrainer: ``transformers.Trainer`` with flashdp's per-layer clipping, DPOptimizer and Poisson sampling.

    args = flashdp.DPTrainingArguments(output_dir="out", per_device_train_batch_size=32, learning_rate=1e-4,
                                       dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, dp_delta=1e-5)
    trainer = flashdp.DPTrainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()          # logs dp_epsilon (at dp_delta) at the end of every epoch

What it changes in the Trainer:

- the model is made private (``make_private(model, dp_max_grad_norm)``) unless it already is;
- ``create_optimizer`` wraps the Trainer's usual optimizer (AdamW from the arguments) in
  ``DPOptimizer`` with an accountant; ``dp_target_epsilon`` instead of ``dp_noise_multiplier`` calibrates
  σ for the planned number of epochs; σ is the whole mechanism's noise multiplier (DPOptimizer adds std
  σ·C_total on every coordinate, C_total = √(Σ_l C_l²) the sensitivity of the clipped sum), so the ε the
  accountant reports for σ is the ε of the released updates;
- the training data loader draws Poisson batches (``poisson_loader``) with sample rate
  ``q = per_device_train_batch_size / len(train_dataset)``; the expected batch size divides the noisy
  sum, not the realised one. An empty batch skips forward and backward; the optimizer still steps
  (the noise of that step is added and accounted);
- ``training_step`` backpropagates the micro-batch's own mean loss: not divided by the accumulation
  steps and not normalised by the window's token count, since each sample's gradient is clipped in the
  layers;
- the Trainer's own gradient clipping (``max_grad_norm``) must be 0: clipping the clipped sum before the
  noise would change the mechanism's sensitivity analysis. Gradient accumulation (a Poisson batch split
  into micro-batches) and multi-process runs are refused with the alternative: flashdp's memory is close
  to non-private training, so a larger ``per_device_train_batch_size`` usually fits; for several
  processes use the DDP recipe of docs/flashdp.md.
- the Trainer's ``grad_norm`` is neither computed nor logged: transformers takes it before
  ``DPOptimizer.step`` adds the noise, so it would be the norm of the private batch's clipped sum, a
  statistic no ε accounts for. The logged ``loss`` is not covered by ε either (docs/flashdp.md, 'What the
  logs reveal').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from .accounting import PrivacyAccountant, get_noise_multiplier
from .data import poisson_loader
from .optimizer import DPOptimizer
from .privatize import make_private, privacy_state

__all__ = ["DPTrainer", "DPTrainingArguments"]


@dataclass
class DPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the DP options (``dp_*``); ``max_grad_norm`` defaults to 0 (see module doc)."""

    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "C: bound on each sample's gradient norm"})
    dp_noise_multiplier: float | None = field(default=None, metadata={"help": "σ (or give dp_target_epsilon)"})
    dp_target_epsilon: float | None = field(default=None, metadata={"help": "calibrate σ for this ε at dp_delta"})
    dp_delta: float = field(default=1e-5, metadata={"help": "δ at which ε is reported"})
    dp_accountant: str = field(default="prv", metadata={"help": "'prv' or 'rdp' (Opacus's accountants)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "must stay 0: clipping is per sample, in the layers"})


class _EpsilonEachEpoch(TrainerCallback):
    """Ask for a log entry at the end of every epoch (DPTrainer.log adds ε to it)."""

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_log = True
        return control


class DPTrainer(Trainer):
    """``transformers.Trainer`` for DP-SGD with flashdp (see the module docstring). Needs ``DPTrainingArguments``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, DPTrainingArguments):
            raise TypeError("DPTrainer: pass flashdp.DPTrainingArguments (it holds dp_noise_multiplier, "
                            "dp_max_grad_norm, dp_delta, ...)")
        if a.max_grad_norm:
            raise ValueError(f"DPTrainer: max_grad_norm={a.max_grad_norm}: clipping the clipped sum would change the "
                             "DP mechanism; set max_grad_norm=0 and bound each sample with dp_max_grad_norm")
        if a.gradient_accumulation_steps != 1:
            raise ValueError("DPTrainer: gradient_accumulation_steps must be 1 (a Poisson batch is one logical step); "
                             "raise per_device_train_batch_size instead")
        if a.world_size > 1:
            raise ValueError("DPTrainer: one process only; for data-parallel DP-SGD wrap the private model in "
                             "DistributedDataParallel yourself (docs/flashdp.md, 'Distributed')")
        if (a.dp_noise_multiplier is None) == (a.dp_target_epsilon is None):
            raise ValueError("DPTrainer: give exactly one of dp_noise_multiplier and dp_target_epsilon")
        if self.train_dataset is None:
            raise ValueError("DPTrainer: needs a train_dataset (its size defines the Poisson sample rate)")
        if privacy_state(self.model) is None:
            make_private(self.model, a.dp_max_grad_norm)
        self.accountant = PrivacyAccountant(a.dp_accountant)
        self.sample_rate = min(1.0, a.per_device_train_batch_size / len(self.train_dataset))
        self.add_callback(_EpsilonEachEpoch())

    @property
    def noise_multiplier(self) -> float:
        """σ: ``dp_noise_multiplier``, or calibrated to ``dp_target_epsilon`` (once per set of arguments: the
        calibration is a search over accountant evaluations)."""
        a = self.args
        if a.dp_noise_multiplier is not None:
            return float(a.dp_noise_multiplier)
        if a.max_steps and a.max_steps > 0:
            steps = a.max_steps
        else:
            steps = math.ceil(a.num_train_epochs / self.sample_rate)
        key = (a.dp_target_epsilon, a.dp_delta, self.sample_rate, steps, a.dp_accountant)
        cached = getattr(self, "_calibrated", None)
        if cached is None or cached[0] != key:
            sigma = get_noise_multiplier(target_epsilon=a.dp_target_epsilon, target_delta=a.dp_delta,
                                         sample_rate=self.sample_rate, steps=steps, mechanism=a.dp_accountant)
            self._calibrated = cached = (key, sigma)
        return cached[1]

    def epsilon(self) -> float:
        """ε spent so far at ``args.dp_delta``."""
        return self.accountant.epsilon(self.args.dp_delta)

    # --------------------------------------------------------------------------------- Trainer hooks
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (AdamW by default, or the one passed in) wrapped in ``DPOptimizer``."""
        if not isinstance(self.optimizer, DPOptimizer):
            inner = super().create_optimizer(model)
            self.optimizer = DPOptimizer(inner, noise_multiplier=self.noise_multiplier,
                                         expected_batch_size=self.args.per_device_train_batch_size,
                                         model=self.model, seed=self.args.seed, accountant=self.accountant,
                                         sample_rate=self.sample_rate)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        """Poisson-sampled batches of the training set (``len`` of it: one expected epoch)."""
        g = torch.Generator().manual_seed(self.args.seed)
        collate = self.data_collator
        return poisson_loader(self.train_dataset, sample_rate=self.sample_rate, generator=g, collate_fn=collate,
                              num_workers=self.args.dataloader_num_workers)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Backward of the micro-batch's own mean loss; an empty Poisson batch does nothing (the step still runs)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        if _batch_size(inputs) == 0:
            return torch.zeros((), device=self.args.device)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss)
        return loss.detach()

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        """None: the Trainer would take the norm of the un-noised clipped sum, which ε does not cover."""
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the privacy spent so far (``dp_epsilon`` at ``dp_delta``) to every log entry."""
        if "grad_norm" in logs:
            raise RuntimeError("DPTrainer: a log entry holds grad_norm, the norm of the un-noised clipped sum; "
                               "it is a private statistic that ε does not cover and must not be logged")
        if "loss" in logs or "train_loss" in logs:
            logs = {**logs, "dp_epsilon": self.epsilon(), "dp_delta": self.args.dp_delta}
        super().log(logs, start_time)


def _batch_size(inputs: Any) -> int | None:
    for v in (inputs.values() if isinstance(inputs, dict) else inputs):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None
