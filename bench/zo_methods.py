"""The ``zo`` comparison: first-order anchors, textbook MeZO and zo2 (plain, offloaded, offloaded with AMP).

- ``adamw``, ``sgd``: forward, backward, optimizer step. AdamW is what fine-tuning usually costs
  (weights, gradients, two moments, activations); SGD without momentum is the cheapest first-order step.
- ``mezo``: MeZO's step as its trainer writes it (four passes over the parameters, ``torch.normal`` from a
  reset seed, a fresh tensor per pass).
- ``zo2``: ``zo2.ZOSGD`` (three fused passes, noise generated inside the kernel, never stored).
- ``zo2-offload``, ``zo2-offload-amp``: the same step with the transformer blocks streamed through the
  device by ``zo2.offload`` (AMP: blocks computed in bf16, or fp16 on GPUs without bf16).
- ``dpzo``, ``dpzo-offload``: ``zo2.DPZOSGD``, the private step (per-sample losses, clipped and noised
  loss differences; docs/dpzo.md) in place and offloaded: the same passes as ``zo2`` plus B scalars.
- ``forward``: two forward passes, the floor of any two-point zeroth-order step (not in the default set).

Each method is one :class:`~memtrain.bench.methods.Method`: its set-up and its memory plan side by side.
The offload methods also time the engine's transfers alone once per round (``engine.time_transfers()``),
from which the run reports the share of the transfer time hidden behind compute.
"""

from __future__ import annotations

import random

import torch

import zo2

from .methods import Method, Runner, Workload, lm_loss
from .planner import PlanInput, backward_parts, forward_only_parts, offload_host, offload_parts

LR, EPS = 1e-7, 1e-3


def _closure(w: Workload):
    def closure() -> torch.Tensor:
        return lm_loss(w.model(input_ids=w.ids).logits, w.ids)

    return closure


def _first_order(make_opt):
    def setup(w: Workload) -> Runner:
        w.model.train()
        opt = make_opt(w.params)
        closure = _closure(w)

        def step() -> float:
            loss = closure()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return Runner(step)

    return setup


def textbook_mezo_step(params: list[torch.Tensor], closure, lr: float, eps: float, weight_decay: float) -> float:
    """MeZO's reference step: four passes over the parameters, z redrawn by torch.normal from a reset seed."""
    seed = random.randint(0, 2**31 - 1)

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    with torch.no_grad():
        perturb(1)
        loss_plus = closure()
        perturb(-2)
        loss_minus = closure()
        perturb(1)
        g = float(loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data - lr * (g * z + weight_decay * p.data)
    return float(loss_plus)


def _mezo(w: Workload) -> Runner:
    w.model.eval()
    params, closure = w.params, _closure(w)
    return Runner(lambda: textbook_mezo_step(params, closure, LR, EPS, 0.0))


def _zo2(w: Workload) -> Runner:
    w.model.eval()
    opt = zo2.ZOSGD(w.params, lr=LR, eps=EPS, seed=0)
    closure = _closure(w)
    return Runner(lambda: float(opt.step(closure)))


def _dp_optimizer(w: Workload) -> zo2.DPZOSGD:
    return zo2.DPZOSGD(w.params, lr=LR, eps=EPS, max_grad_norm=1.0, noise_multiplier=1.0,
                       expected_batch_size=w.ids.shape[0], seed=0)


def _per_sample_closure(w: Workload):
    def closure() -> torch.Tensor:
        return zo2.per_sample_lm_loss(w.model(input_ids=w.ids).logits, w.ids)

    return closure


def _dpzo(w: Workload) -> Runner:
    w.model.eval()
    opt, closure = _dp_optimizer(w), _per_sample_closure(w)
    return Runner(lambda: float(opt.step(closure)))


def _forward(w: Workload) -> Runner:
    w.model.eval()
    closure = _closure(w)

    def step() -> float:
        with torch.no_grad():
            loss = closure()
            closure()
        return loss.item()

    return Runner(step)


def amp_mode(device: str) -> str:
    """The AMP dtype the offload engine computes in: bf16, or fp16 on a GPU without bf16."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def plan_fields(plan) -> dict:
    """The offload engine's plan as a JSON-able dict (its int fields and its printed form)."""
    names = ("resident_bytes", "ring_bytes", "host_bytes", "pinned_host_bytes", "pageable_host_bytes", "num_blocks",
             "ring_slots", "block_bytes")
    return {**{n: getattr(plan, n) for n in names}, "text": str(plan)}


def transfer_timer(engine) -> dict:
    """Extra timings for an offload engine: ``engine.time_transfers()`` (the transfers alone) per round."""
    return {"transfers": lambda: float(engine.time_transfers())}


def _offload(amp: bool, private: bool = False):
    def setup(w: Workload) -> Runner:
        w.model.eval()
        opt = _dp_optimizer(w) if private else zo2.ZOSGD(w.params, lr=LR, eps=EPS, seed=0)
        engine = zo2.offload(w.model, opt, device=w.device, amp=amp_mode(w.device) if amp else None,
                             prefetch=w.options.get("prefetch", 1), verbose=False)
        closure = _per_sample_closure(w) if private else _closure(w)

        def close() -> None:
            opt.flush()
            engine.detach()

        timings = transfer_timer(engine)
        return Runner(lambda: float(opt.step(closure)), close, {"offload_plan": plan_fields(engine.plan)},
                      timings)

    return setup


def _adamw_plan(i: PlanInput) -> dict[str, int]:
    s, b = i.shape, i.bytes
    return {**backward_parts(i), "optimizer state": 2 * s.trainable * b, "update temporaries": s.largest * b}


ZO_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw", "AdamW (first order)", _first_order(lambda ps: torch.optim.AdamW(ps, lr=1e-5)), _adamw_plan,
           optimizer="AdamW: 2 moments per parameter"),
    Method("sgd", "SGD (first order)", _first_order(lambda ps: torch.optim.SGD(ps, lr=1e-5)), backward_parts,
           optimizer="SGD: no state"),
    # MeZO's noise: z and the two temporaries of p.data + scale·z·ε for the largest parameter
    Method("mezo", "textbook MeZO", _mezo, lambda i: forward_only_parts(i, noise_values=3 * i.shape.largest),
           optimizer="MeZO: no state"),
    Method("zo2", "zo2.ZOSGD", _zo2, forward_only_parts,  # z is generated inside the kernel, never stored
           optimizer="ZOSGD: no state"),
    Method("zo2-offload", "zo2 + offload", _offload(False), lambda i: offload_parts(i, amp=False), host_model=True,
           optimizer="ZOSGD: no state", host=lambda i: offload_host(i, amp=False)),
    Method("zo2-offload-amp", "zo2 + offload + AMP", _offload(True), lambda i: offload_parts(i, amp=True),
           host_model=True, optimizer="ZOSGD: no state", host=lambda i: offload_host(i, amp=True)),
    # B per-sample losses per half beside zo2's state: the same plan
    Method("dpzo", "zo2.DPZOSGD (private)", _dpzo, forward_only_parts, optimizer="DPZOSGD: no state"),
    Method("dpzo-offload", "zo2.DPZOSGD + offload", _offload(False, private=True),
           lambda i: offload_parts(i, amp=False), host_model=True, optimizer="DPZOSGD: no state",
           host=lambda i: offload_host(i, amp=False)),
    Method("forward", "two forward passes", _forward, forward_only_parts, optimizer="none"),
)}
DEFAULT_ZO = ["adamw", "sgd", "mezo", "zo2", "zo2-offload", "zo2-offload-amp"]
