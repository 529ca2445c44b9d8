"""White-box gradient canaries for the one-run audit: construction, insertion into the clipped sum, scoring.

Canary i puts ``±C_l`` (a random sign) on one coordinate of every clip group l, so its norm in group l is
exactly C_l and its whole norm C_total = √(Σ_l C_l²): a sample whose clipped gradient meets every group's bound,
the worst case the noise is calibrated for. Canaries use distinct coordinates of a group while the group has at
least m of them, so they are orthogonal there and do not interfere; a smaller group (a bias, a norm's weight)
is shared cyclically (i mod n_l), which costs the audit power but not validity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .privatize import PrivacyState

__all__ = ["Canaries", "make_canaries"]


@dataclass
class _Placement:
    """Where the canaries sit in one parameter: canary ids, flat indices, signed values (±C_l), group index."""

    canary: Tensor  # (k,) int64
    index: Tensor  # (k,) int64, row-major into the parameter
    value: Tensor  # (k,) float64, ±C_l
    group: int


@dataclass
class Canaries:
    """m gradient canaries over a private model's clip groups (see the module docstring).

    Attributes:
        m: number of canaries.
        thresholds: C_l of each clip group with trainable parameters (the groups the canaries span).
        group_names: the groups' names, same order.
        placements: parameter name → where the canaries sit in it.
    """

    m: int
    thresholds: list[float]
    group_names: list[str]
    placements: dict[str, _Placement]

    @property
    def norm(self) -> float:
        """Every canary's norm, C_total = √(Σ_l C_l²)."""
        return float(torch.tensor(self.thresholds, dtype=torch.float64).square().sum().sqrt())

    def sum_of(self, included: Tensor, name: str, like: Tensor) -> Tensor:
        """The sum of the included canaries' parts in parameter ``name``, shaped and typed like ``like``."""
        out = torch.zeros(like.numel(), dtype=torch.float64)
        pl = self.placements.get(name)
        if pl is not None:
            keep = included[pl.canary]
            out.index_add_(0, pl.index[keep], pl.value[keep])
        return out.view(like.shape).to(like.dtype)

    def scores(self, delta: dict[str, Tensor]) -> Tensor:
        """(m,) float64 score of each canary from the parameter change ``delta`` (name → θ_0 − θ_T).

        Group l's part of the score is the canary's coordinate of the change times its sign (its inner product
        with the canary's part C_l·e), weighted by C_l / v_l with v_l the variance of the change over the group's
        coordinates: the matched filter for independent Gaussian noise in each group. With the same noise in every
        group this is the plain inner product up to scale; a group that received less noise than the others
        counts for more. The weights are computed from the released output alone, so the audit stays valid.
        """
        n_groups = len(self.thresholds)
        part = torch.zeros(n_groups, self.m, dtype=torch.float64)
        sq = torch.zeros(n_groups, dtype=torch.float64)
        total = torch.zeros(n_groups, dtype=torch.float64)
        count = torch.zeros(n_groups, dtype=torch.float64)
        for name, pl in self.placements.items():
            d = delta[name].detach().reshape(-1).to("cpu", torch.float64)
            part[pl.group].index_add_(0, pl.canary, d[pl.index] * pl.value.sign())
            sq[pl.group] += d.square().sum()
            total[pl.group] += d.sum()
            count[pl.group] += d.numel()
        var = sq / count - (total / count).square()
        weight = torch.tensor(self.thresholds, dtype=torch.float64) / var.clamp_min(torch.finfo(torch.float64).tiny)
        return (weight[:, None] * part).sum(0)


def make_canaries(state: PrivacyState, m: int, generator: torch.Generator) -> Canaries:
    """Draw m canaries over the clip groups of ``state``'s trainable parameters (see the module docstring)."""
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"flashdp.audit: the number of canaries must be an int ≥ 2, got {m!r}")
    params = state.parameters()
    thresholds, names, placements = [], [], {}
    for group in state.groups:
        members = [(n, params[n]) for n in group.param_names if n in params]
        if not members:
            continue
        g = len(thresholds)
        thresholds.append(float(group.max_norm))
        names.append(group.name)
        sizes = torch.tensor([p.numel() for _, p in members])
        n = int(sizes.sum())
        coord = torch.randperm(n, generator=generator)[torch.arange(m) % n]  # distinct while n ≥ m
        sign = torch.randint(0, 2, (m,), generator=generator, dtype=torch.float64) * 2 - 1
        starts = torch.cumsum(sizes, 0) - sizes
        owner = torch.searchsorted(torch.cumsum(sizes, 0), coord, right=True)
        for k, (pname, _) in enumerate(members):
            ids = (owner == k).nonzero().flatten()
            placements[pname] = _Placement(ids, coord[ids] - starts[k], sign[ids] * group.max_norm, g)
    if not thresholds:
        raise ValueError("flashdp.audit: the model has no trainable parameter in a clip group; nothing to audit")
    return Canaries(m, thresholds, names, placements)
