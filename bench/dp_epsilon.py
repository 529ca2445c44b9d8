"""The ε flashdp reports, and the noise multiplier its mechanism has, for the configurations the project quotes.

    python -m memtrain.bench.dp_epsilon [--out bench/results/dp-epsilon/epsilon.json]

For each configuration: the accountant's ε (Opacus RDP and PRV, through flashdp's adapter) for the σ the
optimizer is given, and the effective noise multiplier 1/√(Σ_l (C_l/s_l)²) measured from the noise DPOptimizer
adds on zero clipped sums (s_l: each group's sample std over ``--steps`` steps, with an exact chi-square
interval). With noise std σ·C_total on every coordinate the two agree; the record also gives the ε of a
mechanism with multiplier σ/√L (per-group std σ·C_l, flashdp's noise before it was calibrated to the whole
sensitivity), for comparison. Deterministic: CPU, fixed seeds, no timing.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

import flashdp

from ._harness import provenance, write_json

DELTA = 1e-5


def llama(hidden: int = 64, layers: int = 2, vocab: int = 64) -> LlamaForCausalLM:
    """The 2-layer Llama of examples/dp_llama_finetune.py's defaults (21 clip groups), random init."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 16),
                                        num_key_value_heads=max(1, hidden // 32), max_position_embeddings=64))


class _Recording(torch.optim.SGD):
    """Records the gradients it is asked to apply, and applies nothing."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().double().clone() for g in self.param_groups for p in g["params"]}


def measured_multiplier(model: torch.nn.Module, sigma: float, steps: int, alpha: float = 1e-6) -> dict:
    """σ_eff = 1/√(Σ_l (C_l/s_l)²) from the noise of ``steps`` steps on zero clipped sums (expected batch 1)."""
    flashdp.make_private(model, 1.0)
    inner = _Recording(model.parameters(), lr=1.0)
    opt = flashdp.DPOptimizer(inner, noise_multiplier=sigma, expected_batch_size=1, seed=0)
    by_id = {id(p): n for n, p in model.named_parameters()}
    draws: dict[str, list[np.ndarray]] = {}
    for _ in range(steps):
        opt.step()
        for i, g in inner.seen.items():
            draws.setdefault(by_id[i], []).append(g.numpy().ravel())
        opt.zero_grad()
    groups = flashdp.privacy_state(model).groups
    c, s, lo, hi = [], [], [], []
    for g in groups:
        x = np.concatenate([v for n in g.param_names for v in draws[n]])
        ss, n = float(np.square(x).sum()), x.size
        c.append(g.max_norm)
        s.append(math.sqrt(ss / n))
        lo.append(math.sqrt(ss / stats.chi2.ppf(1 - alpha / (2 * len(groups)), n)))
        hi.append(math.sqrt(ss / stats.chi2.ppf(alpha / (2 * len(groups)), n)))

    def eff(std: list[float]) -> float:
        return 1.0 / math.sqrt(sum((cl / sl) ** 2 for cl, sl in zip(c, std, strict=True)))

    return {"groups": len(groups), "c_total": math.sqrt(sum(x * x for x in c)), "noise_std": opt.noise_std,
            "effective_multiplier": eff(s), "interval": [eff(lo), eff(hi)], "confidence": 1 - alpha,
            "steps_measured": steps}


def epsilons(sigma: float, q: float, steps: int) -> dict:
    out = {}
    for mech in ("rdp", "prv"):
        acct = flashdp.PrivacyAccountant(mech)
        for _ in range(steps):
            acct.step(noise_multiplier=sigma, sample_rate=q)
        out[mech] = acct.epsilon(DELTA)
    return out


def configuration(name: str, sigma: float, q: float, steps: int, measure_steps: int) -> dict:
    m = measured_multiplier(llama(), sigma, measure_steps)
    return {"name": name, "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": DELTA,
            "epsilon": epsilons(sigma, q, steps), "measured": m,
            "epsilon_of_per_group_std_sigma_C_l": epsilons(sigma / math.sqrt(m["groups"]), q, steps)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m memtrain.bench.dp_epsilon", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="noise steps measured per configuration")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dp-epsilon/epsilon.json)")
    args = p.parse_args(argv)
    # examples/dp_llama_finetune.py's defaults: q = 64/2048, 3 epochs (96 steps), σ calibrated to ε = 8 (PRV).
    q_ex, steps_ex = 64 / 2048, 96
    sigma_ex = flashdp.get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q_ex, steps=steps_ex,
                                            mechanism="prv")
    configs = [configuration("2-layer Llama, sigma 1.5, q 0.04, 2250 steps (Opacus's published RDP 7.3291)",
                             1.5, 0.04, 2250, args.steps),
               configuration("examples/dp_llama_finetune.py defaults (target epsilon 8, PRV)", sigma_ex, q_ex,
                             steps_ex, args.steps)]
    for c in configs:
        m = c["measured"]
        print(f"{c['name']}: sigma {c['noise_multiplier']:.4f}, eps rdp {c['epsilon']['rdp']:.4f} "
              f"prv {c['epsilon']['prv']:.4f}; measured multiplier {m['effective_multiplier']:.4f} "
              f"[{m['interval'][0]:.4f}, {m['interval'][1]:.4f}] over {m['groups']} groups; per-group sigma*C_l "
              f"would be eps rdp {c['epsilon_of_per_group_std_sigma_C_l']['rdp']:.4g}")
    record = {**provenance("cpu", argv), "configurations": configs}
    write_json("dp-epsilon/epsilon", record, args.out)
    return record


if __name__ == "__main__":
    main()
