"""A compact ZO master: an immutable 16-bit base plus a stochastically rounded fp16 residual (reference, pure torch).

zo2's AMP mode keeps an fp32 master (4 bytes per parameter) because a ZO update, lr·g·z ≈ 1e-5 of a weight, is
below a bf16 ulp (2⁻⁸ relative) and would be rounded away. θ_t − θ_0 stays small, so this module stores
θ = base + residual instead: ``base`` is the loaded 16-bit checkpoint, never written; ``residual`` holds the
accumulated updates, rounded stochastically (unbiased: E[round(x)] = x) so that updates far below its ulp
still accumulate in expectation. 2 + 2 bytes per parameter, and the base can stay a memory-mapped checkpoint.

The residual is fp16, not bf16: both are 2 bytes, but at the residual's magnitude (|θ_t − θ_0| ≈ 1e-5..1e-2)
fp16 has 3 more mantissa bits (ulp 2⁻¹¹ relative against bf16's 2⁻⁸), so each stochastic rounding adds 8x less
noise, and its range (normal down to 6.1e-5, subnormal spacing 6e-8 below) covers it; bf16's extra exponent
range is not needed there. A residual beyond fp16's range (|r| > 65504) is refused, not saturated.

The rounding's random bits come from the counter-based Philox stream of z (:mod:`memtrain.kernels.philox`),
keyed by (seed, step, parameter stream id, element index) like z but under a key domain of their own
(:data:`ROUNDING_DOMAIN`), so a run is reproducible, resumable without generator state, and could draw the
same bits in-register on any device; 16 bits per element (one Philox block serves 8 elements), which bounds
the rounding's bias by 2⁻¹⁷ of an ulp.

The step (:func:`zo_step`) is MeZO's, with the perturbation on a working copy as in zo2's AMP pass (the device
copy is perturbed and discarded; only the update reaches the master): L± = loss(θ ± εz), g = (L+ − L−)/2ε,
master ← master − lr·(g·z + wd·θ). The three masters (:class:`FP32Master`, :class:`CompactMaster`,
:class:`RoundedMaster`) differ only in how they store θ and absorb the update. Not wired into
``zo2.offload``; see docs/zo2_offload.md, "A compact master".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from memtrain.kernels.philox import MASK32, PHILOX_MUL, PHILOX_WEYL, philox_fill_, split64
from memtrain.seeds import MASK64, splitmix64, step_seed

__all__ = ["ROUNDING_DOMAIN", "CompactMaster", "FP32Master", "RoundedMaster", "random_bits16", "rounding_key",
           "stochastic_round", "zo_step"]

ROUNDING_DOMAIN = 0x5A4F524F554E4453  # "ZOROUNDS": rounding keys never equal a direction's key
BITS = 16  # random bits per element
RESIDUAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Params = dict[str, torch.Tensor]


def rounding_key(seed: int, step: int) -> int:
    """The Philox key of step ``step``'s rounding bits: the direction schedule under :data:`ROUNDING_DOMAIN`."""
    return step_seed(splitmix64((seed & MASK64) ^ ROUNDING_DOMAIN), step, 0)


def _philox_words(counter: torch.Tensor, stream: int, key: int) -> list[torch.Tensor]:
    """Philox4x32-10 on counters (c, 0..) with stream words as in z's counter; int64 holding uint32 words.

    One 64-bit product per multiply (int64 multiplication wraps modulo 2⁶⁴, so its low and high 32-bit words
    are exact): the same function as :func:`memtrain.kernels.philox.philox4x32_10_torch`, faster.
    """
    s_lo, s_hi = split64(stream)
    c0, c1 = counter & MASK32, counter >> 32
    c2, c3 = torch.full_like(counter, s_lo), torch.full_like(counter, s_hi)
    k0, k1 = split64(key)
    for _ in range(10):
        p0 = c0 * PHILOX_MUL[0]
        p1 = c2 * PHILOX_MUL[1]
        c0, c1, c2, c3 = ((p1 >> 32) & MASK32) ^ c1 ^ k0, p1 & MASK32, ((p0 >> 32) & MASK32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + PHILOX_WEYL[0]) & MASK32
        k1 = (k1 + PHILOX_WEYL[1]) & MASK32
    return [c0, c1, c2, c3]


def random_bits16(numel: int, key: int, stream: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Element i's 16 random bits (int64 in [0, 2¹⁶)): half (i mod 2) of word (i mod 8) // 2 of Philox block i // 8."""
    blocks = torch.arange((numel + 7) // 8, dtype=torch.int64, device=device)
    words = _philox_words(blocks, stream, key)
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]
    return torch.stack(halves, dim=1).reshape(-1)[:numel]


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``dtype``, up with probability (x − lower)/(upper − lower) between its two neighbours.

    ``bits``: ``x.numel()`` uniform integers in [0, 2¹⁶) (:func:`random_bits16`); x goes to its farther
    neighbour when (bits + ½)/2¹⁶ < its probability, so E[result] = x up to 2⁻¹⁷ of the gap. A value
    representable in ``dtype`` is returned exactly (float32 → float32 is the identity). Computed in x's dtype:
    x minus a neighbour (both within one ``dtype`` ulp of each other) is exact there.
    """
    if not x.is_floating_point() or x.dtype.itemsize < dtype.itemsize:
        raise TypeError(f"stochastic_round: x must be a floating tensor at least as wide as {dtype}, got {x.dtype}")
    if bits.shape != (x.numel(),):
        raise ValueError(f"stochastic_round: need one random word per element ({x.numel()}), got {tuple(bits.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("stochastic_round: x holds a NaN or infinite value")
    limit = torch.finfo(dtype).max
    if x.abs().max() > limit:
        raise OverflowError(f"stochastic_round: |x| reaches {x.abs().max().item():.4g}, beyond {dtype}'s range "
                            f"({limit:.4g}); use a wider residual dtype")
    near = x.to(dtype)  # the nearest neighbour; ``other``: the neighbour on x's other side
    nx = near.to(x.dtype)
    other = torch.nextafter(near, torch.where(nx > x, -torch.inf, torch.inf).to(dtype))
    p_other = (x - nx) / (other.to(x.dtype) - nx)  # in [0, 1/2]; 0 when x is representable (exact differences)
    u = (bits.reshape(x.shape).to(x.dtype) + 0.5) / (1 << BITS)
    return torch.where(u < p_other, other, near)


# --------------------------------------------------------------------------------------------- masters
class FP32Master:
    """θ in fp32 (zo2's AMP master): 4 bytes per parameter."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.theta = {n: p.detach().float().clone() for n, p in params.items()}

    def values(self) -> Params:
        return self.theta

    def apply_update(self, deltas: Mapping[str, torch.Tensor], step: int) -> None:
        for n, d in deltas.items():
            self.theta[n].sub_(d)

    def bytes_per_param(self) -> float:
        return 4.0


class RoundedMaster:
    """θ stored in a 16-bit dtype, updated with round-to-nearest: the plain bf16 master (updates below half an
    ulp are lost)."""

    def __init__(self, params: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
        self.theta = {n: p.detach().to(dtype).clone() for n, p in params.items()}

    def values(self) -> Params:
        return {n: t.float() for n, t in self.theta.items()}

    def apply_update(self, deltas: Mapping[str, torch.Tensor], step: int) -> None:
        for n, d in deltas.items():
            self.theta[n] = (self.theta[n].float() - d).to(self.theta[n].dtype)

    def bytes_per_param(self) -> float:
        return float(next(iter(self.theta.values())).element_size())


class CompactMaster:
    """θ = base + residual: ``base`` the immutable 16-bit checkpoint, ``residual`` the stochastically rounded sum
    of the updates (fp16 by default; see the module docstring). Stream ids are the parameters' positions in
    ``params`` (as zo2 numbers them); ``seed`` keys the rounding bits with the step."""

    def __init__(self, params: Mapping[str, torch.Tensor], seed: int,
                 residual_dtype: torch.dtype = torch.float16, base_dtype: torch.dtype = torch.bfloat16) -> None:
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"CompactMaster: residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype}")
        self.seed = seed
        self.base = {n: p.detach().to(base_dtype).clone() for n, p in params.items()}
        self.residual = {n: torch.zeros_like(b, dtype=residual_dtype) for n, b in self.base.items()}
        self.streams = {n: i for i, n in enumerate(params)}
        self.compute_dtype = torch.float64 if residual_dtype == torch.float64 else torch.float32

    def values(self) -> Params:
        return {n: self.base[n].to(self.compute_dtype) + r.to(self.compute_dtype) for n, r in self.residual.items()}

    def apply_update(self, deltas: Mapping[str, torch.Tensor], step: int) -> None:
        key = rounding_key(self.seed, step)
        for n, d in deltas.items():
            r = self.residual[n]
            exact = r.to(self.compute_dtype) - d
            bits = random_bits16(r.numel(), key, self.streams[n], r.device)
            self.residual[n] = stochastic_round(exact, r.dtype, bits)

    def bytes_per_param(self) -> float:
        first = next(iter(self.base))
        return float(self.base[first].element_size() + self.residual[first].element_size())


# ------------------------------------------------------------------------------------------------ step
def directions(shapes: Mapping[str, torch.Size], seed: int, step: int) -> Params:
    """z of step ``step`` for each parameter (stream id = position), as zo2 draws it (one direction, Gaussian)."""
    key = step_seed(seed, step, 0)
    return {n: philox_fill_(torch.empty(s), key, i) for i, (n, s) in enumerate(shapes.items())}


def zo_step(master: FP32Master | CompactMaster | RoundedMaster, loss: Callable[[Params], torch.Tensor], step: int,
            lr: float, eps: float, seed: int, weight_decay: float = 0.0) -> tuple[float, float]:
    """One MeZO step on ``master``; returns (L+, projected gradient g).

    ``loss(params)`` evaluates the model at the given parameter values (e.g. through
    ``torch.func.functional_call``). The perturbation is applied to a working copy θ ± εz in θ's compute
    precision; only the update lr·(g·z + wd·θ) reaches the master.
    """
    theta = master.values()
    z = directions({n: t.shape for n, t in theta.items()}, seed, step)
    with torch.no_grad():
        plus = float(loss({n: t + eps * z[n] for n, t in theta.items()}))
        minus = float(loss({n: t - eps * z[n] for n, t in theta.items()}))
    g = (plus - minus) / (2 * eps)
    master.apply_update({n: lr * (g * z[n] + weight_decay * t) for n, t in theta.items()}, step)
    return plus, g
