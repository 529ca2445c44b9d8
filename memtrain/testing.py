"""Test helpers shipped with the package: an independent NumPy reference of the noise stream, and
closeness checks that report every mismatch.

The NumPy Philox here is written from the paper's definition (Salmon et al., SC'11) with uint64
arithmetic, separately from the C++, Triton and torch implementations it checks; its transforms are
evaluated in float64, so it is the more accurate side of every comparison.
"""

from __future__ import annotations

import numpy as np
import torch

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)

# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox4x32_10_numpy(counter: tuple, key: tuple) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 on arrays of counters: ``counter`` is 4 arrays (or ints), ``key`` 2 ints."""
    c = [np.asarray(x, dtype=np.uint64) & MASK32 for x in counter]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(PHILOX_M[0]) * c[0]
        p1 = np.uint64(PHILOX_M[1]) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & MASK32,
        ]
        k0 = (k0 + np.uint64(PHILOX_W[0])) & MASK32
        k1 = (k1 + np.uint64(PHILOX_W[1])) & MASK32
    return tuple(x.astype(np.uint32) for x in c)


def philox_words_numpy(seed: int, stream: int, n: int, offset: int = 0) -> np.ndarray:
    """The uint32 word of elements ``offset .. offset+n-1`` of stream ``(seed, stream)`` (see csrc/philox.h)."""
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    ctr = idx >> np.uint64(2)
    seed, stream = seed % 2**64, stream % 2**64
    words = philox4x32_10_numpy(
        (ctr & MASK32, ctr >> np.uint64(32), np.full_like(ctr, stream & 0xFFFFFFFF), np.full_like(ctr, stream >> 32)),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    stacked = np.stack(words, axis=-1)  # (n, 4)
    return stacked[np.arange(n), (idx & np.uint64(3)).astype(np.int64)]


def philox_noise_numpy(seed: int, stream: int, n: int, offset: int = 0, dist: str = "normal") -> np.ndarray:
    """Reference z(seed, stream, offset + i) for i < n, in float64."""
    idx = np.arange(offset, offset + n, dtype=np.int64)
    # Each element needs its Box-Muller partner: lanes (0, 1) and (2, 3) of its counter.
    pair_first = idx - (idx % 2)
    first = philox_words_numpy(seed, stream, n + 2, offset - (offset % 2))
    base = offset - (offset % 2)
    w_even = first[pair_first - base]
    w_odd = first[pair_first + 1 - base]
    own = np.where(idx % 2 == 0, w_even, w_odd)
    if dist == "rademacher":
        return np.where(own >> np.uint32(31), 1.0, -1.0)
    if dist != "normal":
        raise ValueError(f"dist must be 'normal' or 'rademacher', got {dist!r}")

    def unit(w: np.ndarray) -> np.ndarray:
        return (w >> np.uint32(9)).astype(np.float64) * 2.0**-23 + 2.0**-24

    radius = np.sqrt(-2.0 * np.log(unit(w_even)))
    theta = 2.0 * np.pi * unit(w_odd)
    return np.where(idx % 2 == 0, radius * np.cos(theta), radius * np.sin(theta))


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                         name: str = "tensor", max_report: int = 10) -> None:
    """Like torch.testing.assert_close, but lists the worst mismatches with their indices."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    if bad.any():
        flat = bad.flatten().nonzero().flatten()
        worst = flat[err.flatten()[flat].argsort(descending=True)[:max_report]]
        lines = [
            f"  [{tuple(np.unravel_index(int(i), a.shape))}] got {a.flatten()[i].item():.9g} "
            f"expected {e.flatten()[i].item():.9g} (err {err.flatten()[i].item():.3g})"
            for i in worst
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol}, rtol={rtol}, "
            f"max err {err.max().item():.3g}):\n" + "\n".join(lines)
        )


# SplitMix64 (Steele, Lea and Flood, OOPSLA'14; Vigna's splitmix64.c): the state advances by the golden
# gamma and each output is the state passed through two xor-shift-multiply rounds and a final xor-shift.
SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
# The first four outputs of splitmix64.c started from state 0, as published with the xoshiro generators.
SPLITMIX64_KAT = (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC)


def splitmix64_next(state: int) -> tuple[int, int]:
    """One call of splitmix64.c's ``next()``: returns (new state, output), all arithmetic modulo 2^64."""
    state = (state + SPLITMIX64_GAMMA) % 2**64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return state, z ^ (z >> 31)


def zo_step_seeds(base_seed: int, step: int, q: int) -> list[int]:
    """The Philox keys of the q directions of step ``step`` (0-based) of a ZOSGD run with ``base_seed``.

    The documented schedule, written here from SplitMix64's definition: with H(x) the output of one
    ``next()`` from state x, the key of direction k is ``H(H(H(base_seed) ^ step) ^ k)``, base seed taken
    modulo 2^64. Every (step, direction) gets its own key, so nothing but (base seed, step) is stored.
    """

    def h(x: int) -> int:
        return splitmix64_next(x % 2**64)[1]

    run_key = h(base_seed)
    return [h(h(run_key ^ step) ^ k) for k in range(q)]


def causal_lm_loss_float64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float64, as Hugging Face causal LMs define it (position t predicts
    label t+1; label -100 is ignored), without their cast of the logits to float32.

    logits: (B, T, V); labels: (B, T). Returns a 0-d float64 tensor.
    """
    logits = logits.double()[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    logp = logits[keep] - torch.logsumexp(logits[keep], dim=-1, keepdim=True)
    return -logp.gather(1, target[keep].unsqueeze(1)).mean()


def mezo_noise(params: list[torch.Tensor], seed: int, streams: list[int], dist: str = "normal") -> list[torch.Tensor]:
    """z of one direction for each parameter (from :func:`philox_noise_numpy`), in the parameter's dtype."""
    return [torch.from_numpy(philox_noise_numpy(seed, stream, p.numel(), 0, dist)).to(p.dtype).view(p.shape)
            for p, stream in zip(params, streams, strict=True)]


def mezo_estimate(
    params: list[torch.Tensor],
    closure,
    seeds: list[int],
    streams: list[int],
    hparams: list[tuple[float, float, float]],
    dist: str = "normal",
) -> tuple[list[float], list[float]]:
    """MeZO's two-point estimates at θ (Malladi et al. 2023, Algorithm 1), one per seed, leaving θ as it was
    (up to the rounding of the parameters' dtype: use float64).

    For each seed: θ += εz, L+ = closure(), θ -= 2εz, L- = closure(), θ += εz, with z stored in full.
    ``hparams[i] = (lr, eps, weight_decay)`` of ``params[i]``. Returns (each L+, each (L+ - L-) / 2).
    """
    losses, diffs = [], []
    with torch.no_grad():
        for seed in seeds:
            z = mezo_noise(params, seed, streams, dist)
            for p, zi, (_, eps, _) in zip(params, z, hparams, strict=True):
                p.add_(eps * zi)
            loss_plus = float(closure())
            for p, zi, (_, eps, _) in zip(params, z, hparams, strict=True):
                p.sub_(2 * eps * zi)
            loss_minus = float(closure())
            for p, zi, (_, eps, _) in zip(params, z, hparams, strict=True):
                p.add_(eps * zi)
            losses.append(loss_plus)
            diffs.append((loss_plus - loss_minus) / 2)
    return losses, diffs


def mezo_update(
    params: list[torch.Tensor],
    diffs: list[float],
    seeds: list[int],
    streams: list[int],
    hparams: list[tuple[float, float, float]],
    dist: str = "normal",
) -> None:
    """MeZO's update with q estimates: ``p ← p − lr · (Σ_k (diffs[k] / ε) z_k / q + wd · p)``, where
    ``diffs[k] = (L+_k − L-_k) / 2`` belongs to direction ``seeds[k]`` and ε, lr, wd are ``p``'s own."""
    q = len(seeds)
    zs = [mezo_noise(params, seed, streams, dist) for seed in seeds]
    with torch.no_grad():
        for i, (p, (lr, eps, wd)) in enumerate(zip(params, hparams, strict=True)):
            grad = sum(d / eps * z[i] for d, z in zip(diffs, zs, strict=True)) / q
            p.sub_(lr * (grad + wd * p))


def mezo_step_reference(
    params: list[torch.Tensor],
    closure,
    seeds: list[int],
    streams: list[int],
    hparams: list[tuple[float, float, float]],
    dist: str = "normal",
) -> tuple[float, list[float]]:
    """The textbook MeZO step: :func:`mezo_estimate` then :func:`mezo_update` with its own estimates.

    With several ``seeds`` the q estimates are taken at the same θ and averaged. Returns (mean loss at
    θ+εz, each direction's (L+ - L-) / 2).
    """
    losses, diffs = mezo_estimate(params, closure, seeds, streams, hparams, dist)
    mezo_update(params, diffs, seeds, streams, hparams, dist)
    return sum(losses) / len(seeds), diffs
