"""The ``dp`` comparison: non-DP SGD, flashdp, Opacus (per-sample hooks) and Opacus ghost clipping.

A step is forward, next-token cross-entropy, backward, optimizer step and zero_grad, with SGD at the
same learning rate for all. flashdp clips per layer; Opacus clips flat, with the same C = 1 and σ = 1.
When Opacus refuses the model (Llama's RMSNorm, for one), the method is reported unavailable with
Opacus's own message. Each method is one :class:`~memtrain.bench.methods.Method`: its set-up and its
memory plan side by side.
"""

from __future__ import annotations

import warnings

import torch

from .methods import Method, MethodUnavailable, Runner, Workload, lm_loss
from .planner import PlanInput, backward_parts

LR = 1e-3


def _sgd_runner(w: Workload, opt: torch.optim.Optimizer) -> Runner:
    def step() -> float:
        loss = lm_loss(w.model(input_ids=w.ids).logits, w.ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return Runner(step)


def _nondp(w: Workload) -> Runner:
    w.model.train()
    return _sgd_runner(w, torch.optim.SGD(w.params, lr=LR))


def _flashdp(w: Workload) -> Runner:
    import flashdp

    w.model.train()
    params = w.params
    flashdp.make_private(w.model, max_grad_norm=1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(params, lr=LR), noise_multiplier=1.0,
                              expected_batch_size=w.ids.shape[0], seed=0)
    return _sgd_runner(w, opt)


def _opacus(ghost: bool):
    def setup(w: Workload) -> Runner:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        w.model.train()
        crit = torch.nn.CrossEntropyLoss()
        loader = DataLoader(TensorDataset(w.ids), batch_size=w.ids.shape[0])
        mode = {"criterion": crit, "grad_sample_mode": "ghost"} if ghost else {"grad_sample_mode": "hooks"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = PrivacyEngine().make_private(
                    module=w.model, optimizer=torch.optim.SGD(w.params, lr=LR), data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, **mode)
        except Exception as err:  # Opacus's validator says what it cannot clip
            raise MethodUnavailable(f"Opacus refuses this model: {type(err).__name__}: {err}") from err
        gmodel, opt = out[0], out[1]
        dp_crit = out[2] if ghost else crit
        ids = w.ids
        v = None

        def step() -> float:
            nonlocal v
            logits = gmodel(input_ids=ids).logits[:, :-1]
            v = logits.shape[-1]
            flat = logits.reshape(-1, v), ids[:, 1:].reshape(-1)
            loss = dp_crit(*flat, shape=logits.shape) if ghost else dp_crit(*flat)
            with warnings.catch_warnings():  # Opacus's hooks warn on every backward pass
                warnings.simplefilter("ignore")
                loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()

        return Runner(step)

    return setup


def _flashdp_plan(i: PlanInput) -> dict[str, int]:
    # the noise is drawn one parameter at a time
    return {**backward_parts(i), "noise": i.shape.largest * i.bytes}


def _opacus_plan(i: PlanInput) -> dict[str, int]:
    # B gradients per trainable weight, and the largest one again while it is clipped
    s = i.shape
    return {**backward_parts(i), "per-sample gradients": i.batch * (s.trainable + s.largest) * i.bytes}


def _opacus_ghost_plan(i: PlanInput) -> dict[str, int]:
    # the loss's graph is retained for the second, rescaled backward pass
    return {**backward_parts(i), "retained loss graph": 3 * i.tokens * i.shape.vocab * i.bytes}


DP_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("nondp", "non-DP SGD", _nondp, backward_parts, optimizer="SGD: no state"),
    Method("flashdp", "flashdp", _flashdp, _flashdp_plan, optimizer="DPOptimizer(SGD): no state"),
    Method("opacus", "Opacus (per-sample hooks)", _opacus(False), _opacus_plan,
           optimizer="Opacus DPOptimizer(SGD): no state"),
    Method("opacus-ghost", "Opacus ghost clipping", _opacus(True), _opacus_ghost_plan,
           optimizer="Opacus DPOptimizer(SGD): no state"),
)}
DEFAULT_DP = list(DP_METHODS)
