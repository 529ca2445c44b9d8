"""DP-SGD's Gaussian noise, counter-based: each value is a pure function of (step key, stream, element).

Definition (``DPOptimizer`` and any sharded caller must follow it exactly):

- step key ``k_t = memtrain.seeds.step_seed(seed, t) = splitmix64(splitmix64(splitmix64(seed) ^ t) ^ 0)`` (64-bit),
  ``t`` the number of steps the optimizer applied before this one (skipped NaN/inf steps do not count);
- stream ``s_p``: the position of parameter p among the model's trainable parameters in
  ``model.named_parameters()`` order, a tied parameter counted once (``PrivacyState.stream_ids``);
- element ``i``: the row-major index into the whole (unsharded) parameter;
- noise ``n_p[i] = s · z(k_t, s_p, i)`` with ``s = σ · C_total`` (``DPOptimizer.group_noise_std``: the same std
  for every parameter, C_total = √(Σ_l C_l²) over the released clip groups) and ``z`` memtrain's
  Philox4x32-10 normal (``memtrain.kernels.zo_perturb``; NumPy reference ``memtrain.testing.philox_noise_numpy``),
  added in fp32 to the clipped sum, once per logical step, before the division by the expected batch size.
- ``secure_mode``: four fresh 64-bit keys ``k_1..k_4`` from the OS CSPRNG (``secrets``) per step and
  ``n_p[i] = s · (z(k_1, s_p, i) + z(k_2, s_p, i) + z(k_3, s_p, i) + z(k_4, s_p, i)) / 2``, the
  sum-of-four-normals construction of Holohan & Braghin 2021 (as Opacus), in one fused pass; not
  reproducible from the seed, by design.

So a shard holding elements ``[o, o + n)`` of p adds exactly its part of the unsharded noise by passing
``offset=o``. Under torch.distributed rank 0's keys are broadcast and every rank adds the same noise to
its (identical, all-reduced) sums, or under FSDP2 its shard's part of the unsharded tensor's noise (the
offset from :func:`flashdp.fsdp.local_shard`). Cost: one read and one write of the gradient; z is generated in
registers (≈1 G elements/s on a 2-core CPU with the C++ extension, against ≈150 M/s for ``torch.normal``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from memtrain.kernels.zo_perturb import zo_perturb_
from memtrain.seeds import step_seed

__all__ = ["SECURE_TERMS", "add_noise_", "broadcast_keys", "noise_keys"]

SECURE_TERMS = 4  # normals summed per coordinate in secure mode (their sum ÷ 2 is N(0, 1))


def noise_keys(seed: int, step: int, secure: bool = False) -> list[int]:
    """The Philox keys of step ``step``: ``[step_seed(seed, step)]``, or 4 fresh CSPRNG keys in secure mode."""
    if secure:
        return [secrets.randbits(64) for _ in range(SECURE_TERMS)]
    return [step_seed(seed, step)]


def add_noise_(grad: torch.Tensor, keys: Sequence[int], std: float, stream: int, offset: int = 0) -> torch.Tensor:
    """``grad[i] += std · z(keys, stream, offset + i)`` in place (i row-major), one fused pass; returns ``grad``.

    One key: ``z`` is one normal; four keys: the sum of the four normals ÷ 2 (secure mode).
    """
    if len(keys) not in (1, SECURE_TERMS):
        raise ValueError(f"flashdp.noise.add_noise_: expected 1 or {SECURE_TERMS} keys, got {len(keys)}")
    coef = std if len(keys) == 1 else std / 2
    if grad.is_contiguous():
        return zo_perturb_(grad, list(keys), [coef] * len(keys), stream, 0.0, "normal", offset)
    dense = grad.contiguous()  # the stream follows the row-major index, not a permuted memory order
    zo_perturb_(dense, list(keys), [coef] * len(keys), stream, 0.0, "normal", offset)
    return grad.copy_(dense)


def broadcast_keys(keys: list[int], device: torch.device, src: int = 0) -> list[int]:
    """Every rank gets rank ``src``'s keys (one small collective): the noise is then the same on all ranks."""
    import torch.distributed as dist

    signed = [k - (1 << 64) if k >= (1 << 63) else k for k in keys]
    t = torch.tensor(signed, dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return [int(v) % (1 << 64) for v in t.tolist()]
