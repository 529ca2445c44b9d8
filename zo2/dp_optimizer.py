"""DPZOSGD: differentially private zeroth-order SGD (DP-ZO, Tang et al. 2024; DPZero, Zhang et al. 2023).

In a zeroth-order step the directions z_k are drawn from the seed alone, independent of the data; the data
enter only through the loss differences. Privatising those differences privatises the step. One step, on
top of :class:`zo2.ZOSGD`'s passes (same seeds, same 2q halves, same fused finish pass):

1. the closure returns per-sample losses ℓ_i (shape (B,), B the realised batch) at θ+εz_k and θ-εz_k;
2. each sample's differences d_ik = (ℓ_i(θ+εz_k) - ℓ_i(θ-εz_k)) / 2ε are clipped:

   - ``clipping="joint"`` (default): the vector (d_i1, ..., d_iq) is scaled to L2 norm ≤ C, so one sample
     moves the released q-vector (S_1, ..., S_q), S_k = Σ_i clip(d_i)_k, by at most C in L2: sensitivity C;
     each S_k gets N(0, σ²C²) (for q = 1: d_i clipped to [-C, C]);
   - ``clipping="aggregate"`` (DP-AggZO): a_i = mean_k d_ik is clipped to [-C, C]; one scalar is released,
     S = Σ_i clip(a_i) + N(0, σ²C²), and every direction uses it (an estimate along mean_k z_k);

3. g_k = (S_k + noise_k) / expected_batch_size (the expected, not the realised, batch: Poisson sampling);
4. θ ← θ - lr·(Σ_k g_k z_k / q + wd·θ), ZOSGD's finish pass with g_k as the projected gradients.

Either way the released quantity is a Gaussian mechanism of sensitivity C with noise multiplier σ, so the
accountant is stepped with (σ, sample_rate) per applied step. Clipping each direction to [-C, C] separately
would give sensitivity C√q and need noise σC√q per direction; joint clipping releases the same ratio with
less noise. The noise comes from flashdp's counter-based stream (:mod:`flashdp.noise`) keyed by
(noise seed, step), the noise seed derived from ``seed`` in a domain of its own so that it never equals a
direction's key (the update reveals z, and noise drawn with z's key would be known to anyone who sees it);
``secure_mode`` draws the keys from the OS's CSPRNG instead. See docs/dpzo.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from flashdp.noise import add_noise_, broadcast_keys, noise_keys
from memtrain.seeds import MASK64, splitmix64
from zo2.distributed import resolve_group
from zo2.optimizer import ZOSGD, Closure, NonFiniteLossWarning
from zo2.per_sample_loss import per_sample_values
from zo2.transitions import StepRecord

__all__ = ["CLIPPING_MODES", "DPZOSGD", "NOISE_DOMAIN"]

CLIPPING_MODES = ("joint", "aggregate")
# XORed into the base seed before deriving the noise keys: the noise stream is disjoint from the directions'.
NOISE_DOMAIN = 0x44505A4F4E4F4953  # "DPZONOIS"
DP_ATTRIBUTES = ("max_grad_norm", "noise_multiplier", "expected_batch_size", "secure_mode", "accountant",
                 "sample_rate", "clipping", "last_batch_size")


def _positive(name: str, value: object, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"DPZOSGD: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class DPZOSGD(ZOSGD):
    """Private zeroth-order SGD: ZOSGD whose projected gradient is clipped per sample and noised.

    Args:
        params: parameters or param groups (all groups must share ``eps``: each sample's difference is
            divided by it before clipping).
        lr, eps, weight_decay, num_perturbations: as :class:`zo2.ZOSGD`.
        max_grad_norm: C, the bound on each sample's (vector of) projected-gradient difference(s).
        noise_multiplier: σ ≥ 0; the noise std of each released sum is σ·C.
        expected_batch_size: the expected samples per step (sample_rate × dataset size under Poisson
            sampling); the noised sums are divided by it.
        seed: base seed of the directions and, in its own domain, of the noise (default
            ``torch.initial_seed()``).
        secure_mode: noise keys from the OS's CSPRNG each step, four normals summed (Holohan & Braghin 2021,
            as flashdp and Opacus); not reproducible from the seed.
        accountant: ``flashdp.PrivacyAccountant("rdp"|"prv")`` or an Opacus accountant, stepped with
            (noise_multiplier, sample_rate) after each applied step (a skipped step releases nothing).
        sample_rate: Poisson sampling rate, required with ``accountant``.
        clipping: "joint" (per-sample L2 clipping of the q differences) or "aggregate" (DP-AggZO: clip the
            mean of a sample's q differences); see the module docstring.
        distribution, check_dropout, process_group: as :class:`zo2.ZOSGD`; across ranks the clipped sums
            and counts are summed in one all-reduce and the same noise is added on every rank, once. Under
            FSDP2 (:func:`zo2.attach_fsdp`) the same holds over the mesh's ranks: each rank clips the
            per-sample losses of its own rows, perturbs and updates its shards.

    ``step(closure)``: ``closure()`` returns the per-sample losses, a 1-D tensor of length B (B may be 0: the
    step then releases noise only). Returns the mean loss at θ+εz_k over samples and directions (for
    monitoring only: it is not privatised), NaN for an empty batch or a skipped step. ``projected_grad`` is
    the mean of the privatised g_k, ``projected_grads`` each; ``last_batch_size`` the realised B.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        eps: float,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        seed: int | None = None,
        secure_mode: bool = False,
        accountant: Any = None,
        sample_rate: float | None = None,
        num_perturbations: int = 1,
        weight_decay: float = 0.0,
        clipping: str = "joint",
        distribution: str = "normal",
        check_dropout: bool = True,
        process_group: object | None = None,
    ) -> None:
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, allow_zero=True)
        self.expected_batch_size = _positive("expected_batch_size", expected_batch_size)
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"DPZOSGD: clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
        if accountant is not None:
            if not callable(getattr(accountant, "step", None)):
                raise TypeError(f"DPZOSGD: accountant must have step(noise_multiplier=, sample_rate=) "
                                f"(flashdp.PrivacyAccountant or an Opacus accountant), got {type(accountant).__name__}")
            if sample_rate is None:
                raise ValueError("DPZOSGD: pass sample_rate= (the Poisson sampling rate) together with accountant=")
        if sample_rate is not None and not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(f"DPZOSGD: sample_rate must be in (0, 1], got {sample_rate!r}")
        if seed is None:
            seed = int(torch.initial_seed()) % (2**63)
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed,
                         num_perturbations=num_perturbations, distribution=distribution,
                         check_dropout=check_dropout, process_group=process_group)
        self.secure_mode = bool(secure_mode)
        self.accountant = accountant
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.clipping = clipping
        self.last_batch_size = 0

    # ------------------------------------------------------------------------------------ checks
    def _check_groups(self) -> None:
        super()._check_groups()
        eps = {g["eps"] for g in self.param_groups}
        if len(eps) > 1:
            raise ValueError(f"DPZOSGD: the param groups have different eps {sorted(eps)}; a private step divides "
                             "each sample's loss difference by one ε before clipping: give every group the same eps")

    def half_loss(self, result: object) -> torch.Tensor:
        """One half's per-sample losses as a float64 CPU tensor (B,); a scalar is refused with the fix."""
        return per_sample_values(result)

    def reduce_losses(self, values: list) -> list:
        """Per-sample losses stay on their rank: :meth:`finish_step` sums the clipped differences across ranks."""
        return values

    @property
    def noise_seed(self) -> int:
        """The base of the noise keys: ``splitmix64(seed ⊕ NOISE_DOMAIN)``, never a direction's key."""
        return splitmix64((self.seed & MASK64) ^ NOISE_DOMAIN)

    def noise_keys(self, step: int) -> list[int]:
        """The Philox keys of step ``step``'s noise (flashdp's stream; four CSPRNG keys in secure mode)."""
        return noise_keys(self.noise_seed, step, self.secure_mode)

    # -------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             accumulate: Sequence[Closure] | None = None) -> torch.Tensor:
        """One private step; ``closure()`` returns the per-sample losses (B,). See the class docstring."""
        if accumulate is not None:
            raise TypeError("DPZOSGD.step: accumulate is not supported: a sample's clipped contribution must cover "
                            "all q directions of the step. Pass one closure over the whole logical batch (it may "
                            "loop over micro-batches and concatenate their per-sample losses)")
        return super().step(closure)

    def _clipped_sums(self, losses: list[torch.Tensor], step: int) -> tuple[torch.Tensor, int, float]:
        """Σ_i clip(d_i) per released coordinate, the batch size and Σ_i mean_k ℓ+_ik from the halves' losses."""
        q = len(losses) // 2
        sizes = {v.numel() for v in losses}
        if len(sizes) > 1:
            raise ValueError(f"DPZOSGD.step: step {step}'s halves returned per-sample losses of different lengths "
                             f"{[v.numel() for v in losses]}; every perturbed forward pass must see the same batch")
        halves = torch.stack(losses).view(q, 2, -1)
        d = (halves[:, 0] - halves[:, 1]) / (2.0 * self.param_groups[0]["eps"])  # (q, B)
        c = self.max_grad_norm
        if self.clipping == "aggregate":
            sums = d.mean(0).clamp(-c, c).sum().reshape(1)
        elif q == 1:
            sums = d[0].clamp(-c, c).sum().reshape(1)
        else:
            norms = torch.linalg.vector_norm(d, dim=0)
            sums = (d * (c / norms.clamp(min=c))).sum(1)
        return sums, halves.shape[-1], float(halves[:, 0].mean(0).sum())

    def finish_step(self, record: StepRecord, losses: Sequence[torch.Tensor],
                    like: tuple[torch.dtype, torch.device] | None = None) -> torch.Tensor:
        """Count the step of ``record`` from the halves' per-sample losses (L+_0, L-_0, L+_1, ...; the list may
        stop at the first non-finite one): clip, sum over the samples (and ranks), add the noise once, divide by
        the expected batch size, and set ``record.diffs`` for ZOSGD's finish pass. A non-finite loss on any
        rank skips the step on all of them: the parameters are restored, the accountant is not stepped. The
        returned mean L+ has ``like``'s (dtype, device), the closure's."""
        where = {} if like is None else {"dtype": like[0], "device": like[1]}
        if record.finished or record.step != self.step_count:
            raise RuntimeError(f"DPZOSGD.finish_step: the record of step {record.step} is not the running step "
                               f"{self.step_count} or was already finished")
        losses = list(losses)
        q = len(record.seeds)
        released = 1 if self.clipping == "aggregate" else q
        bad = len(losses) < record.num_halves or not all(bool(torch.isfinite(v).all()) for v in losses)
        if len(losses) > record.num_halves:
            raise ValueError(f"DPZOSGD.finish_step: step {record.step} has {record.num_halves} halves but "
                             f"{len(losses)} results were given")
        sums, size, plus = (torch.zeros(released, dtype=torch.float64), 0, 0.0) if bad else \
            self._clipped_sums(losses, record.step)
        group = None
        if getattr(self, "process_group", None) is not None:
            group = resolve_group(self.process_group)
            sums, size, plus, bad = _sum_over_ranks(sums, size, plus, bad, group)
        self.step_count += 1
        if bad:
            self.mark_skipped(record)
            warnings.warn(
                f"DPZOSGD: step {record.step} saw a non-finite per-sample loss; the update was skipped, the "
                f"parameters restored and nothing released or accounted ({self.skipped_steps} skipped so far). Check "
                "the data and the model's numerics (a lower eps or fp32 may help)", NonFiniteLossWarning, stacklevel=3)
            return torch.tensor(float("nan"), **where)
        noised = sums + self._noise(released, record.step, group)
        g = (noised / self.expected_batch_size).tolist()
        if self.clipping == "aggregate":
            g = g * q
        eps0 = self.param_groups[0]["eps"]
        record.diffs = [gk * eps0 for gk in g]  # ZOSGD's finish pass applies lr · diff / (ε q) to each z_k
        self.projected_grads = g
        self.projected_grad = sum(g) / q
        self.last_batch_size = size
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return torch.tensor(plus / size if size else float("nan"), **where)

    def _noise(self, n: int, step: int, group: object) -> torch.Tensor:
        """σC·z for the n released sums from flashdp's stream (stream 0 of the step's noise keys)."""
        noise = torch.zeros(n, dtype=torch.float64)
        if self.noise_multiplier == 0:
            return noise
        keys = self.noise_keys(step)
        if self.secure_mode and getattr(self, "process_group", None) is not None:
            import torch.distributed as dist

            if group is not None and dist.get_world_size(group) != dist.get_world_size():
                raise ValueError("DPZOSGD: secure_mode across ranks needs the default process group (rank 0's "
                                 "CSPRNG keys are broadcast to every rank); pass process_group=True")
            from zo2.distributed import _reduce_device

            keys = broadcast_keys(keys, _reduce_device(group))
        return add_noise_(noise, keys, self.noise_multiplier * self.max_grad_norm, stream=0)

    # ------------------------------------------------------------------------------- serialisation
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in DP_ATTRIBUTES})
        return state

    def _settings(self) -> dict:
        return {"max_grad_norm": self.max_grad_norm, "noise_multiplier": self.noise_multiplier,
                "expected_batch_size": self.expected_batch_size, "sample_rate": self.sample_rate,
                "clipping": self.clipping, "secure_mode": self.secure_mode}

    def state_dict(self) -> dict:
        """ZOSGD's state (seed, step) plus the ``dpzo`` entry: the mechanism's settings and the accountant's state."""
        sd = super().state_dict()
        state_of = getattr(self.accountant, "state_dict", None)
        sd["dpzo"] = {**self._settings(), "accountant": state_of() if callable(state_of) else None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: the same seed and step (the same directions and noise), the accountant's history restored.
        Settings that differ from the saved run's are an error, as is an accountant missing on either side."""
        state_dict = dict(state_dict)
        dp = state_dict.pop("dpzo", None)
        if dp is None:
            raise KeyError("DPZOSGD.load_state_dict: no 'dpzo' entry; this state_dict was not saved by "
                           "DPZOSGD.state_dict()")
        differ = {k: (v, dp.get(k)) for k, v in self._settings().items() if dp.get(k) != v}
        if differ:
            raise ValueError(f"DPZOSGD.load_state_dict: the saved run used different settings (now, saved): {differ}; "
                             "construct the optimizer with the saved values to resume it")
        saved = dp.get("accountant")
        if (saved is None) != (self.accountant is None):
            what = "had no accountant" if saved is None else "had an accountant and this optimizer has none"
            raise ValueError(f"DPZOSGD.load_state_dict: the saved run {what}; the privacy spent so far would be "
                             "lost. Pass the same kind of accountant= as the saved run")
        super().load_state_dict(state_dict)
        if saved is not None:
            self.accountant.load_state_dict(saved)


def _sum_over_ranks(sums: torch.Tensor, size: int, plus: float, bad: bool, group: object
                    ) -> tuple[torch.Tensor, int, float, bool]:
    """One all-reduce of (clipped sums, batch size, Σ ℓ+, non-finite flag) over the data-parallel ranks."""
    import torch.distributed as dist

    from zo2.distributed import _reduce_device

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("DPZOSGD: process_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group before the first step")
    t = torch.cat([sums, torch.tensor([size, plus, float(bad)], dtype=torch.float64)]).to(_reduce_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t = t.cpu()
    n = sums.numel()
    return t[:n], int(t[n].item()), float(t[n + 1].item()), bool(t[n + 2].item() > 0)
