"""DPOptimizer: noise once per logical step on the clipped sums the DP layers left in ``.grad``.

``step()``:

1. (distributed) the clipped sums are all-reduced (SUM) across ranks, unless
   ``flashdp.DistributedDataParallel`` already summed them during backward; FSDP2's sharded gradients
   (DTensors) were summed by its reduce-scatter (see :mod:`flashdp.fsdp`) and are not all-reduced;
2. skip the step with a warning if any gradient is NaN/inf (nothing is applied, no noise drawn), found
   with one device-to-host synchronisation for all parameters (and, with sharded gradients, one
   all-reduce of a flag, so that every rank skips together);
3. ``p.grad += σ·C_total·z`` for every trainable parameter p (:meth:`DPOptimizer.group_noise_std`), where
   ``C_total = √(Σ_l C_l²)`` over the clip groups whose gradients this optimizer releases and z the
   counter-based normal of :mod:`flashdp.noise` indexed by (step key, p's stream id, element index):
   fp32, one fused pass per parameter, added once per ``step`` whatever the number of backward passes
   since the last one (gradient accumulation adds it once). Under torch.distributed rank 0's step keys
   are broadcast and every rank adds the same noise to its identical sums; a shard adds its part of the
   unsharded tensor's noise (the element index is its global offset plus the local index);
4. ``p.grad /= expected_batch_size`` (Poisson sampling: the expected, not the realised, batch size);
5. the inner optimizer steps; the accountant, if any, records the step with σ.

Why σ·C_total on every coordinate: with per-layer clipping a sample's whole clipped gradient is bounded by
the vector (C_1, …, C_L), so the clipped sum has L2 sensitivity C_total. A Gaussian mechanism with std s_l on
group l has the effective noise multiplier 1/√(Σ_l (C_l/s_l)²); with s_l = σ·C_total for every l it is σ, the
multiplier the accountant is told (Opacus's per-layer rule; with the default thresholds C_l = C/√L,
C_total = C, the noise of flat clipping at C). Per-group std σ·C_l would give σ/√L, whatever the thresholds.

``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers and
``state_dict`` work as with the inner optimizer; ``state_dict`` also carries (seed, step count), which is
the whole noise state, so a resumed run draws the same noise.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.optim import Optimizer

from memtrain.param_specs import check_moment_shapes, check_param_specs, param_specs

from . import fsdp, noise
from .errors import ModelChangedError
from .privatize import PrivacyState, state_of_parameter
from .profiling import ALL_REDUCE, FINITE_CHECK, NOISE, SCALE, region

__all__ = ["DPOptimizer"]


def _state_of(params: list[torch.Tensor], model: torch.nn.Module | None) -> PrivacyState:
    if model is not None:
        st = model.__dict__.get("_flashdp_state")
        if st is None:
            raise ValueError("flashdp.DPOptimizer: the model was not made private; "
                             "call flashdp.make_private(model, ...)")
        return st
    for p in params:
        st = state_of_parameter(p)
        if st is not None:
            return st
    raise ValueError(
        "flashdp.DPOptimizer: none of the optimizer's parameters belongs to a model made private; call "
        "flashdp.make_private(model, max_grad_norm) first (before or after building the inner optimizer)"
    )


class DPOptimizer(Optimizer):
    """Wrap ``optimizer`` (SGD, Adam, AdamW, ...) for DP-SGD on a model made private by flashdp.

    Args:
        optimizer: the inner optimizer over the model's parameters.
        noise_multiplier: σ ≥ 0, the multiplier the accountant is stepped with; every coordinate of every
            released gradient gets noise of std σ·C_total (:attr:`noise_std`), C_total = √(Σ_l C_l²).
        expected_batch_size: the expected number of samples per logical step (> 0).
        max_grad_norm: C; defaults to make_private's, a different value is an error.
        model: the private model (optional: found from the parameters).
        seed: seed of the noise (default ``torch.initial_seed()``; ignored with ``secure_mode``); the noise of
            step t is a pure function of (seed, t), see :mod:`flashdp.noise`.
        secure_mode: key the noise with four fresh 64-bit keys from the OS's CSPRNG every step, and sum four
            normals (÷2) per coordinate against floating-point attacks (Holohan & Braghin 2021, as Opacus).
        accountant: an object with ``step(noise_multiplier=, sample_rate=)`` (flashdp.PrivacyAccountant or an
            Opacus accountant), stepped with ``sample_rate`` each applied step.
        sample_rate: Poisson sampling rate q, needed with ``accountant``.
    """

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, expected_batch_size: int,
                 max_grad_norm: float | None = None, model: torch.nn.Module | None = None, seed: int | None = None,
                 secure_mode: bool = False, accountant: Any = None, sample_rate: float | None = None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"flashdp.DPOptimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        sigma = noise_multiplier
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"flashdp.DPOptimizer: noise_multiplier must be a finite number ≥ 0, got {sigma!r}")
        if not isinstance(expected_batch_size, (int, float)) or expected_batch_size <= 0:
            raise ValueError(
                f"flashdp.DPOptimizer: expected_batch_size must be > 0 (the expected samples per step, "
                f"sample_rate × dataset size under Poisson sampling), got {expected_batch_size!r}")
        if accountant is not None and sample_rate is None:
            raise ValueError("flashdp.DPOptimizer: pass sample_rate= together with accountant=")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = _state_of(params, model)
        if max_grad_norm is not None and not math.isclose(float(max_grad_norm), state.max_grad_norm, rel_tol=1e-9):
            raise ValueError(
                f"flashdp.DPOptimizer: max_grad_norm={max_grad_norm} differs from the {state.max_grad_norm} given to "
                "make_private; the clipping already happened in the layers with make_private's value. Omit "
                "max_grad_norm here, or call make_private again with the value you want."
            )
        self.inner = optimizer
        self.privacy = state
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.max_grad_norm = state.max_grad_norm
        self.secure_mode = secure_mode
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.steps = 0
        self.skipped_steps = 0
        self._total_cache: float | None = None  # C_total while add_noise runs (see group_noise_std)
        self._seed = seed if seed is not None else int(torch.initial_seed()) % (2**63)
        fsdp.configure(state)  # fully_shard applied after make_private: sum from the first backward on
        # Shared, not copied: schedulers and users editing param_groups edit the inner optimizer's.
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._zero_grad_profile_name = "flashdp.DPOptimizer.zero_grad"

    # -- noise ---------------------------------------------------------------------------------------------
    def _dp_params(self) -> list[torch.Tensor]:
        seen, out = set(), []
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def noise_keys(self) -> list[int]:
        """The Philox keys of the step about to be applied (four fresh CSPRNG keys in secure mode)."""
        return noise.noise_keys(self._seed, self.steps, self.secure_mode)

    def released_threshold(self) -> float:
        """C_total = √(Σ_l C_l²) over the clip groups holding at least one parameter this optimizer releases.

        The L2 sensitivity of the clipped sum the optimizer releases: a sample changes group l's clipped sum by at
        most C_l, whichever of the group's parameters are trainable. A group with no released parameter (frozen
        after make_private, or held by another optimizer) contributes nothing to what this optimizer releases, so
        it is not counted (Opacus's per-layer rule: the thresholds of the parameters the optimizer holds); it is
        counted again as soon as one of its parameters is released (computed at each step, never cached across
        steps: a group unfrozen later cannot be left out).
        """
        names = self.privacy.param_names
        released = {names[id(p)] for p in self._dp_params() if id(p) in names}
        return math.sqrt(sum(g.max_norm ** 2 for g in self.privacy.groups
                             if any(n in released for n in g.param_names)))

    def group_noise_std(self, name: str) -> float:
        """The noise std added to every coordinate of parameter ``name``'s gradient: σ·C_total, the same for
        every group (see the module docstring for why not σ·C_l)."""
        if name not in self.privacy.stream_of:
            raise KeyError(f"flashdp.DPOptimizer.group_noise_std: {name!r} is not a trainable parameter of the "
                           f"private model (known: {list(self.privacy.stream_of)[:5]}...)")
        total = self._total_cache if self._total_cache is not None else self.released_threshold()
        return self.noise_multiplier * total

    @property
    def noise_std(self) -> float:
        """σ·C_total: the std of the noise on every coordinate of every released gradient (before ÷ B)."""
        return self.noise_multiplier * self.released_threshold()

    @torch.no_grad()
    def add_noise(self, params: list[torch.Tensor], keys: list[int] | None = None) -> None:
        """``p.grad += group_noise_std(p)·z(keys, stream_p, i)`` for each parameter (see :mod:`flashdp.noise`); a
        sharded gradient adds the part of the unsharded tensor's noise its shard holds."""
        if self.noise_multiplier == 0:
            return
        if keys is None:
            keys = self.noise_keys()
        names = self.privacy.param_names
        self._total_cache = self.released_threshold()  # one pass over the parameters per step, not one per parameter
        try:
            for p in params:
                name = names[id(p)]
                local, offset = fsdp.local_shard(p.grad)
                noise.add_noise_(local, keys, self.group_noise_std(name), self.privacy.stream_of[name], offset=offset)
        finally:
            self._total_cache = None

    # -- step ----------------------------------------------------------------------------------------------
    def step(self, closure=None):
        """One DP-SGD step; returns the closure's loss (if any), or None when the step was skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.privacy.check_unchanged()
        params = self._dp_params()
        names = self.privacy.param_names
        unknown = [tuple(p.shape) for p in params if id(p) not in names]
        if unknown:
            raise ModelChangedError(
                f"flashdp.DPOptimizer: the optimizer holds {len(unknown)} trainable parameter(s) (shapes "
                f"{unknown[:5]}) that the private model does not hold now. Call make_private on the model that owns "
                "them, and build the optimizer after fully_shard (FSDP2 replaces every parameter by a sharded one).")
        for p in params:
            if p.grad is None:  # an empty batch, or a layer unused this step: its clipped sum is zero
                p.grad = torch.zeros_like(p)
        shards = [fsdp.local_shard(p.grad) for p in params]
        sharded = any(fsdp.is_sharded(p.grad) for p in params)
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not self.privacy.grads_summed_by_ddp:
            with region(ALL_REDUCE):
                for p in params:
                    if not fsdp.is_sharded(p.grad):  # FSDP2 has summed the sharded ones in its reduce-scatter
                        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        grads = [g for g, _ in shards]
        device = grads[0].device if grads else torch.device("cpu")
        with region(FINITE_CHECK):
            finite = self._all_finite(grads)
            if distributed and sharded:  # each rank checked its shards only: skip together or not at all
                finite = fsdp.all_ranks(finite, device)
        if not finite:
            bad = [names[id(p)] for p, g in zip(params, grads, strict=True) if not torch.isfinite(g).all()]
            where = f"in {bad[:5]}{'...' if len(bad) > 5 else ''}" if bad else "in another rank's shards"
            self.skipped_steps += 1
            warnings.warn(
                f"flashdp.DPOptimizer: NaN/inf gradients {where}; the step is "
                "skipped and nothing is applied. Call zero_grad() before the next backward; lower the learning "
                "rate or use fp32/bf16 autocast if this repeats.", RuntimeWarning, stacklevel=2)
            return None
        if self.noise_multiplier != 0:
            keys = self.noise_keys()
            with region(NOISE):
                if distributed:  # rank 0's keys: every rank adds the same noise to the same sums, noise once in all
                    keys = noise.broadcast_keys(keys, device)
                self.add_noise(params, keys)
        # The noise (one Philox pass, ~10x faster than torch.normal on 2 cores), the finite check and this
        # division are one pass over the gradients each, small next to a step. The division stays a pass of its
        # own: folding it into the noise pass (p + σC/B·z + (1/B − 1)·p) would cost up to B·2^-24 relative error
        # on p/B. Profiled on the Llama 6x512 preset (2 CPU cores, bench/RESULTS.md) the three take 0.7% of a
        # non-DP step and the per-sample norms of backward 6.8%: the norms are most of what a private step adds.
        if grads:
            with region(SCALE):
                torch._foreach_div_(grads, self.expected_batch_size)
        self.inner.step()
        self.steps += 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss

    @staticmethod
    def _all_finite(grads: list[torch.Tensor]) -> bool:
        """Whether every gradient is finite, with one device-to-host synchronisation for all of them."""
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        dev = norms[0].device
        return bool(torch.isfinite(torch.stack([n.to(dev, torch.float32) for n in norms])).all())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, plus the noise state and each parameter's shape and dtype."""
        sd = self.inner.state_dict()
        sd["flashdp"] = {**self.noise_state_dict(), "params": param_specs(self._inner_params())}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` for this model; a state saved for other parameters (count,
        shapes, dtypes) is refused with the tensor that differs, before anything is changed."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("flashdp", None)
        params, where = self._inner_params(), "flashdp.DPOptimizer.load_state_dict"
        if extra is not None and "params" in extra:
            check_param_specs(extra["params"], params, where, self._param_name)
        elif sum(len(g["params"]) for g in state_dict.get("param_groups", [])) == len(params):
            check_moment_shapes(state_dict.get("state", {}), params, where, self._param_name)
        self.inner.load_state_dict(state_dict)
        self.share_inner_state()
        if extra is not None:
            self.load_noise_state_dict(extra)

    def _inner_params(self) -> list[torch.Tensor]:
        """The inner optimizer's parameters in its state_dict's order (each once)."""
        seen: set[int] = set()
        return [p for g in self.inner.param_groups for p in g["params"] if not (id(p) in seen or seen.add(id(p)))]

    def _param_name(self, p: torch.Tensor) -> str | None:
        model = self.privacy.model_ref()
        return None if model is None else next((n for n, q in model.named_parameters() if q is p), None)

    def noise_state_dict(self) -> dict[str, Any]:
        """DPOptimizer's own state, the whole noise state (seed, step count) with its settings: plain Python values.

        With torch.distributed.checkpoint, save this next to the model's and the inner optimizer's state
        (``flashdp.CheckpointState`` does), never ``get_state_dict(model, dp_optimizer)``: DCP may call
        ``step()`` on an optimizer without state, which here would add noise and count a step.
        """
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "seed": self._seed, "noise": "philox",
                "noise_multiplier": self.noise_multiplier, "expected_batch_size": self.expected_batch_size}

    def load_noise_state_dict(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`noise_state_dict` saved (the noise continues from the saved seed and step)."""
        self.steps = int(extra["steps"])
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._seed = int(extra["seed"])
        if "generators" in extra:
            warnings.warn(
                "flashdp.DPOptimizer.load_state_dict: this state comes from a flashdp version that drew noise "
                "from torch generators; their states are ignored and the noise continues from (seed, step) with "
                "the counter-based stream, so it differs from the original run's.", RuntimeWarning, stacklevel=2)

    def share_inner_state(self) -> None:
        """Share the inner optimizer's ``param_groups`` and ``state`` again after they were loaded.

        torch's load_state_dict replaces the inner optimizer's group dicts: without this an LR scheduler built on
        this wrapper would keep editing the stale ones.
        """
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("flashdp.DPOptimizer: add parameter groups to the inner optimizer before wrapping it, "
                         "after make_private has seen the parameters")

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, inner={self.inner!r})")
