"""``memtrain-bench dp-audit``: the one-run privacy audit (``flashdp.audit``) of a small private model on CPU.

The model is a residual MLP classifier (an input layer, ``--blocks`` residual blocks of a bias-free
``Linear(width, width)`` and tanh, a head): ``--blocks`` + 2 clip groups. The data is a synthetic task with
real batches: 4 Gaussian classes in 32 dimensions, Poisson-sampled (``flashdp.poisson_loader``). The defaults
(18 clip groups, σ = 20, 100 steps, 1000 canaries) run in minutes on CPU; the accountant's ε for the canaries is
2.00 at δ = 1e-5. With every group given σ·C_l instead of σ·C_total (the noise bug the
audit's tests plant, an effective multiplier σ/√18), the lower bound exceeds it.

``--optimizer dpzo`` audits ``zo2.DPZOSGD`` instead (``zo2.dp_audit``) on the same model and data, unchanged (no
``make_private``: the per-sample losses come from ``cross_entropy(..., reduction="none")``). Its canaries are
per-sample loss differences of ±2C following orthogonal ±1 patterns over the run's released coordinates (steps ×
q with joint clipping). At the same defaults (σ = 20, 100 steps, q = 16, 1000 canaries) the canaries' mechanism is
again 0.5-GDP (accountant ε 2.00 at δ = 1e-5); with the noise scaled by 1/10 (``python -m
memtrain.bench.dp_audit_planted noise-tenth --optimizer dpzo``) the lower bound exceeds it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import flashdp
from flashdp.audit import AuditResult, one_run_audit
from zo2.dp_audit import DPZOAuditResult
from zo2.dp_audit import one_run_audit as dpzo_audit

FEATURES, CLASSES = 32, 4


class ResidualMLP(nn.Module):
    """x (B, 32) → logits (B, 4) through ``blocks`` residual tanh blocks of width ``width``."""

    def __init__(self, blocks: int, width: int):
        super().__init__()
        self.inp = nn.Linear(FEATURES, width, bias=False)
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.head = nn.Linear(width, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def synthetic_task(samples: int, seed: int) -> torch.utils.data.TensorDataset:
    """``samples`` points of 4 Gaussian classes (unit variance around random centres of norm ≈ 2)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * (2.0 / FEATURES**0.5)
    y = torch.randint(0, CLASSES, (samples,), generator=g)
    x = centres[y] + torch.randn(samples, FEATURES, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor | None:
    """Mean cross-entropy; None for an empty Poisson batch (the step and its noise still happen)."""
    x, y = batch
    if len(y) == 0:
        return None
    return nn.functional.cross_entropy(model(x), y)


def per_sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy per sample, shape (B,) (DPZOSGD's closure returns these; B may be 0)."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = ("one-run privacy audit (Steinke, Nasr, Jagielski 2023) of flashdp or zo2.DPZOSGD on a small CPU model: "
            "an ε lower bound beside the accountant's ε")
    p = sub.add_parser("dp-audit", help=text, description=text,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", default="flashdp", choices=["flashdp", "dpzo"],
                   help="the mechanism audited: flashdp (DP-SGD, gradient canaries in the clipped sum) or dpzo "
                        "(zo2.DPZOSGD, canaries as per-sample loss differences; the largest power of 2 <= steps × "
                        "released per step must exceed --canaries)")
    p.add_argument("--num-perturbations", type=int, default=16,
                   help="dpzo only: q, directions per step (joint clipping releases q coordinates per step)")
    p.add_argument("--clipping", default="joint", choices=["joint", "aggregate"],
                   help="dpzo only: DPZOSGD's clipping (aggregate releases 1 coordinate per step)")
    p.add_argument("--zo-eps", type=float, default=1e-3, help="dpzo only: DPZOSGD's perturbation scale ε")
    p.add_argument("--blocks", type=int, default=16, help="residual blocks (flashdp's clip groups = blocks + 2)")
    p.add_argument("--width", type=int, default=32, help="block width (each block's group has width² coordinates)")
    p.add_argument("--noise-multiplier", type=float, default=20.0, help="σ")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="C (flashdp: C_l = C/√L per group; dpzo: the bound on a sample's projected differences)")
    p.add_argument("--steps", type=int, default=100, help="training steps of the one run")
    p.add_argument("--batch", type=int, default=32, help="expected batch size (Poisson sampling)")
    p.add_argument("--samples", type=int, default=3200, help="training set size")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (flashdp: of SGD; dpzo: of DPZOSGD)")
    p.add_argument("--canaries", type=int, default=1000, help="m")
    p.add_argument("--guesses", type=int, default=None, help="k+ = k- (None: m // 20)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the bound and of the accountant's ε")
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp"], help="flashdp.PrivacyAccountant mechanism")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, data, canaries and noise")
    p.add_argument("--out", default=None, help="output folder (None: bench-runs/dp-audit-<time>)")


def check_args(args: argparse.Namespace) -> list[str]:
    """What is wrong with the options of ``dp-audit`` (empty when they are usable)."""
    problems = []
    for name in ("width", "steps", "batch", "samples"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.blocks < 0:
        problems.append(f"--blocks must be >= 0, got {args.blocks}")
    for name in ("noise_multiplier", "max_grad_norm", "lr"):
        if not getattr(args, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.canaries < 2:
        problems.append(f"--canaries must be >= 2, got {args.canaries}")
    guesses = args.canaries // 20 if args.guesses is None else args.guesses
    if guesses < 1 or 2 * guesses > args.canaries:
        problems.append(f"--guesses must be in [1, canaries/2], got {guesses} with --canaries {args.canaries}")
    for name in ("confidence", "delta"):
        if not 0 < getattr(args, name) < 1:
            problems.append(f"--{name} must be in (0, 1), got {getattr(args, name)}")
    if args.optimizer == "dpzo":
        if args.num_perturbations < 1:
            problems.append(f"--num-perturbations must be >= 1, got {args.num_perturbations}")
        if not args.zo_eps > 0:
            problems.append(f"--zo-eps must be > 0, got {args.zo_eps}")
        released = max(args.steps, 0) * (max(args.num_perturbations, 0) if args.clipping == "joint" else 1)
        patterned = 1 << (released.bit_length() - 1) if released else 0
        if args.canaries + 1 > patterned:
            problems.append(f"--optimizer dpzo: {args.canaries} canaries need {args.canaries + 1} orthogonal patterns "
                            f"but --steps {args.steps} × {released // max(args.steps, 1)} released per step give "
                            f"{patterned} (the largest power of 2 ≤ {released}); raise --steps or --num-perturbations"
                            " or lower --canaries")
    return problems


def run_audit(args: argparse.Namespace) -> AuditResult | DPZOAuditResult:
    """Build the model and data of ``args`` and audit one run of ``args.optimizer``."""
    torch.manual_seed(args.seed)
    if args.optimizer == "dpzo":
        model = ResidualMLP(args.blocks, args.width)
        data = synthetic_task(args.samples, args.seed)
        loader = flashdp.poisson_loader(data, expected_batch_size=args.batch,
                                        generator=torch.Generator().manual_seed(args.seed))
        return dpzo_audit(model, loader, per_sample_loss, noise_multiplier=args.noise_multiplier, steps=args.steps,
                          max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch, lr=args.lr,
                          eps=args.zo_eps, num_perturbations=args.num_perturbations, clipping=args.clipping,
                          canaries=args.canaries, k_plus=args.guesses, k_minus=args.guesses,
                          confidence=args.confidence, delta=args.delta, accountant=args.accountant, seed=args.seed)
    model = flashdp.make_private(ResidualMLP(args.blocks, args.width), max_grad_norm=args.max_grad_norm)
    data = synthetic_task(args.samples, args.seed)
    loader = flashdp.poisson_loader(data, expected_batch_size=args.batch,
                                    generator=torch.Generator().manual_seed(args.seed))
    return one_run_audit(model, loader, loss_fn, noise_multiplier=args.noise_multiplier, steps=args.steps,
                         expected_batch_size=args.batch, lr=args.lr, canaries=args.canaries,
                         k_plus=args.guesses, k_minus=args.guesses, confidence=args.confidence,
                         delta=args.delta, accountant=args.accountant, seed=args.seed)
