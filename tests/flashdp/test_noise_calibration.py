"""The noise each clip group receives, measured, against the σ the accountant is stepped with.

With per-layer clipping a sample's clipped gradient is bounded by the vector (C_1, …, C_L); a Gaussian
mechanism with std s_l on group l has the effective noise multiplier σ_eff = 1/√(Σ_l (C_l/s_l)²). These tests
measure each s_l from the noise alone (zero clipped sums, an inner optimizer that records what it is given),
take the thresholds and the groups from the module structure (not from flashdp's state), and require σ_eff
to equal the accounted σ within an exact chi-square confidence interval. Noise of std σ·C_l per group (the
mechanism of multiplier σ/√L) lies far outside it; each test also checks that its interval is narrow
enough to tell the two apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import stats
from torch import nn

import flashdp

# Each test's false-failure probability: at most ALPHA, split over its groups (Bonferroni).
ALPHA = 1e-6


class _Recording(torch.optim.SGD):
    """Records the gradients it is asked to apply, and applies nothing."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().double().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None}


def _std_interval(x: np.ndarray, alpha: float) -> tuple[float, float]:
    """Exact (1 − alpha) interval for the std s of zero-mean normal samples x: Σx²/s² ~ χ²(n)."""
    n, ss = x.size, float(np.square(x).sum())
    return (math.sqrt(ss / stats.chi2.ppf(1 - alpha / 2, n)), math.sqrt(ss / stats.chi2.ppf(alpha / 2, n)))


def _effective(thresholds: list[float], stds: list[float]) -> float:
    return 1.0 / math.sqrt(sum((c / s) ** 2 for c, s in zip(thresholds, stds, strict=True)))


def check_effective_multiplier(noise: dict[str, np.ndarray], groups: list[list[str]], thresholds: list[float],
                               sigma: float) -> tuple[float, float]:
    """Assert σ_eff = σ within its (1 − ALPHA) interval; returns the interval.

    σ_eff is increasing in every s_l, so the group intervals' lower (upper) ends give σ_eff's lower (upper)
    end; with ALPHA/G per group the joint coverage is at least 1 − ALPHA.
    """
    ivals = [_std_interval(np.concatenate([noise[n].ravel() for n in g]), ALPHA / len(groups)) for g in groups]
    lo = _effective(thresholds, [a for a, _ in ivals])
    hi = _effective(thresholds, [b for _, b in ivals])
    point = _effective(thresholds, [math.sqrt(np.mean(np.concatenate([noise[n].ravel() for n in g]) ** 2))
                                    for g in groups])
    assert lo <= sigma <= hi, (f"effective noise multiplier {point:.4f} (interval [{lo:.4f}, {hi:.4f}]) differs "
                               f"from the accounted σ = {sigma}")
    # Power: the interval excludes σ/√L, the multiplier of per-group std σ·C_l.
    assert hi < sigma * (1 + (1 - 1 / math.sqrt(len(groups))) / 2) and lo > sigma / math.sqrt(len(groups)), (lo, hi)
    return lo, hi


def module_groups(model: nn.Module) -> list[list[str]]:
    """Clip groups from the module structure: a module's trainable parameters; groups sharing one merge."""
    pname = {id(p): n for n, p in model.named_parameters()}
    groups: list[set[int]] = []
    for mod in model.modules():
        ids = {id(p) for p in mod._parameters.values() if p is not None and p.requires_grad}
        if ids:
            merged = [g for g in groups if g & ids]
            for g in merged:
                groups.remove(g)
                ids |= g
            groups.append(ids)
    return [sorted(pname[i] for i in g) for g in groups]


def measured_noise(model: nn.Module, sigma: float, steps: int, seed: int = 0) -> tuple[dict, flashdp.DPOptimizer]:
    """The noise of ``steps`` steps on zero clipped sums (expected_batch_size 1: the recorded grad is the noise)."""
    inner = _Recording(model.parameters(), lr=1.0)  # frozen parameters too: the optimizer skips them
    opt = flashdp.DPOptimizer(inner, noise_multiplier=sigma, expected_batch_size=1, seed=seed)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[np.ndarray]] = {}
    for _ in range(steps):
        opt.step()  # no backward: every clipped sum is zero, the gradient is the noise
        for i, g in inner.seen.items():
            out.setdefault(names[i], []).append(g.numpy())
        opt.zero_grad()
    return {n: np.stack(v) for n, v in out.items()}, opt


class _Mixed(nn.Module):
    """Groups of very different sizes: a 29×13 Linear, a LayerNorm(29) (58 coordinates), a 29×7 Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(13, 29), nn.LayerNorm(29), nn.Linear(29, 7)

    def forward(self, x):
        return self.b(self.ln(self.a(x)))


class _Tied(nn.Module):
    """A tied embedding and head (one group, counted once), a frozen Linear (no group), a Linear."""

    def __init__(self, V=31, d=9):
        super().__init__()
        self.emb, self.frozen, self.mid = nn.Embedding(V, d), nn.Linear(d, d), nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.frozen(self.emb(ids))))


# The smallest group (LayerNorm: 58 coordinates) over 40 steps: 2320 draws, its interval ±~10% at ALPHA/3,
# against the factor 1/√3 ≈ 0.58 of the planted σ·C_l.
STEPS = 40


def test_default_thresholds_effective_multiplier_is_sigma():
    torch.manual_seed(0)
    model, C, sigma = _Mixed(), 2.5, 1.3
    groups = module_groups(model)
    flashdp.make_private(model, C)
    noise, opt = measured_noise(model, sigma, STEPS)
    thresholds = [C / math.sqrt(len(groups))] * len(groups)
    check_effective_multiplier(noise, groups, thresholds, sigma)
    assert opt.noise_std == pytest.approx(sigma * C, rel=1e-12)  # C_total = C with the default thresholds


def test_overridden_thresholds_effective_multiplier_is_sigma():
    torch.manual_seed(0)
    model, sigma = _Mixed(), 0.9
    groups = module_groups(model)  # [a.*], [ln.*], [b.*]
    overrides = {"a": 3.0, "ln": 0.02, "b": 0.7}
    flashdp.make_private(model, 1.0, group_max_grad_norms=overrides)
    noise, opt = measured_noise(model, sigma, STEPS)
    thresholds = [overrides[g[0].split(".")[0]] for g in groups]
    check_effective_multiplier(noise, groups, thresholds, sigma)
    assert opt.noise_std == pytest.approx(sigma * math.sqrt(3.0**2 + 0.02**2 + 0.7**2), rel=1e-12)


def test_tied_group_counts_once_and_frozen_layer_not_at_all():
    torch.manual_seed(0)
    model, C, sigma = _Tied(), 1.0, 2.0
    groups = module_groups(model)  # [emb.weight], [mid.*]: the head's weight is emb.weight
    assert len(groups) == 2
    flashdp.make_private(model, C, group_max_grad_norms={"head": 0.4})
    noise, _ = measured_noise(model, sigma, STEPS)
    thresholds = [0.4 if g == ["emb.weight"] else C / math.sqrt(2) for g in groups]
    check_effective_multiplier(noise, groups, thresholds, sigma)


def test_group_frozen_after_make_private_is_not_released_and_not_counted():
    """A group frozen after make_private releases nothing: C_total covers the released groups only."""
    torch.manual_seed(0)
    model, C, sigma = _Mixed(), 1.0, 1.1
    flashdp.make_private(model, C)
    model.b.requires_grad_(False)
    groups = module_groups(model)  # a, ln
    noise, opt = measured_noise(model, sigma, STEPS)
    assert set(noise) == {"a.weight", "a.bias", "ln.weight", "ln.bias"}
    check_effective_multiplier(noise, groups, [C / math.sqrt(3)] * 2, sigma)
    model.b.requires_grad_(True)  # released again: counted again
    assert opt.noise_std == pytest.approx(sigma * C, rel=1e-12)


WORKER = """
import os, sys
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
import flashdp

rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(13, 29), nn.LayerNorm(29), nn.Linear(29, 7))  # 29 rows: uneven shards
flashdp.make_private(model, 1.0, group_max_grad_norms={"0": 2.0})
if mode == "ddp":
    model = flashdp.DistributedDataParallel(model)
else:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))


class Recording(torch.optim.SGD):
    def step(self, closure=None):
        self.seen = [p.grad for g in self.param_groups for p in g["params"]]


inner = Recording(model.parameters(), lr=1.0)
opt = flashdp.DPOptimizer(inner, noise_multiplier=1.5, expected_batch_size=1, seed=5)
names = [n.removeprefix("module.") for n, _ in model.named_parameters()]
x = torch.zeros(2, 13)
noise = {n: [] for n in names}
for _ in range(int(sys.argv[6])):
    (model(x) * 0).sum().backward()  # zero clipped sums through the real backward and its reduction
    opt.step()
    for n, g in zip(names, inner.seen):
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        noise[n].append(g.detach().double().numpy().copy())
    opt.zero_grad()
np.savez(f"{out}.{rank}", **{n: np.stack(v) for n, v in noise.items()})
dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_effective_multiplier_is_sigma(tmp_path, spawn_ranks, mode):
    """DDP and FSDP2 over 2 gloo ranks: the global tensor's noise has σ_eff = σ, added once (the two ranks see
    the same noise; twice would be √2 larger)."""
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp")
    out = str(tmp_path / "noise")
    spawn_ranks(WORKER, 2, mode, out, str(STEPS))
    r0, r1 = np.load(f"{out}.0.npz"), np.load(f"{out}.1.npz")
    for n in r0.files:
        np.testing.assert_array_equal(r0[n], r1[n])
    groups = [["0.bias", "0.weight"], ["1.bias", "1.weight"], ["2.bias", "2.weight"]]
    check_effective_multiplier({n: r0[n] for n in r0.files}, groups, [2.0, 1 / math.sqrt(3), 1 / math.sqrt(3)], 1.5)
