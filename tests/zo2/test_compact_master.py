"""zo2/compact_master.py: unbiased, reproducible stochastic rounding, and a compact step that is the fp32 step when
its residual has fp32 precision."""

import pytest
import torch
from scipy import stats

from memtrain.kernels.philox import MASK32, philox4x32_10_torch, philox_fill_, split64
from memtrain.seeds import step_seed
from zo2.compact_master import (
    CompactMaster,
    FP32Master,
    RoundedMaster,
    random_bits16,
    rounding_key,
    stochastic_round,
    zo_step,
)

ALPHA = 1e-6  # false-failure probability of each statistical assertion


# ------------------------------------------------------------------------------------------ random bits
def test_bits_are_the_philox_words_split_in_halves():
    """Element i: half i % 2 (low first) of word (i % 8) // 2 of block i // 8 of Philox(key; i // 8, stream)."""
    key, stream, n = (1 << 64) - 977, (5 << 32) + 3, 37
    blocks = torch.arange((n + 7) // 8, dtype=torch.int64)
    s_lo, s_hi = split64(stream)
    words = philox4x32_10_torch((blocks & MASK32, blocks >> 32, torch.full_like(blocks, s_lo),
                                 torch.full_like(blocks, s_hi)), split64(key))
    expected = [int(words[(i % 8) // 2][i // 8]) >> (16 * (i % 2)) & 0xFFFF for i in range(n)]
    assert random_bits16(n, key, stream).tolist() == expected


def test_rounding_keys_are_per_step_and_never_a_direction_key():
    keys = {rounding_key(seed, step) for seed in range(3) for step in range(50)}
    assert len(keys) == 150
    directions = {step_seed(seed, step, k) for seed in range(3) for step in range(50) for k in range(4)}
    assert not keys & directions


# ---------------------------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [1e-3 + 3.1e-7, -0.37, 2.5e-6, 3.0e-5 + 1e-9])  # normal, negative, fp16 subnormals
def test_stochastic_rounding_is_unbiased(dtype, value):
    n = 1 << 17
    x = torch.full((n,), value, dtype=torch.float32)
    r = stochastic_round(x, dtype, random_bits16(n, key=1234, stream=7))
    lower, upper = sorted(set(r.float().tolist()))  # exactly the two neighbours of x
    assert lower < x[0].item() < upper
    p = (x[0].double().item() - lower) / (upper - lower)
    ups = int((r.float() == upper).sum())
    # ups ~ Binomial(n, p) when E[r] = x (the 16-bit threshold moves p by at most 2^-17, far below the test's
    # resolution ~ sqrt(p(1-p)/n) ≈ 1e-3); round-to-nearest or a biased threshold gives p far outside.
    assert stats.binomtest(ups, n, p).pvalue > ALPHA
    mean_error = abs(r.double().mean().item() - x[0].double().item())
    assert mean_error <= 5.5 * (upper - lower) * (p * (1 - p) / n) ** 0.5 + (upper - lower) * 2.0**-17  # 5.5 σ


def test_representable_values_are_returned_exactly():
    x = torch.tensor([0.0, 1.0, -2.0**-20, 65504.0, 2.0**-24], dtype=torch.float32)
    bits = torch.full((5,), 0)  # the bits most likely to round away
    assert torch.equal(stochastic_round(x, torch.float16, bits).float(), x)
    y = torch.randn(1000)
    assert torch.equal(stochastic_round(y, torch.float32, random_bits16(1000, 1, 1)), y)  # fp32 -> fp32: identity


def test_rounding_is_reproducible_and_differs_across_steps_and_tensors():
    x = torch.randn(4096) * 1e-3
    again = [stochastic_round(x, torch.float16, random_bits16(4096, rounding_key(3, 10), 2)) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    other_step = stochastic_round(x, torch.float16, random_bits16(4096, rounding_key(3, 11), 2))
    other_tensor = stochastic_round(x, torch.float16, random_bits16(4096, rounding_key(3, 10), 3))
    # x is not representable in fp16 (almost surely), so each element goes up or down; two independent bit
    # streams disagree on ~p(1-p) ≥ some of the 4096 elements: at least 100 differing is certain in practice
    assert int((other_step != again[0]).sum()) > 100
    assert int((other_tensor != again[0]).sum()) > 100


def test_bad_input_is_refused_with_the_reason():
    bits = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(OverflowError, match="wider residual dtype"):
        stochastic_round(torch.tensor([1e5, 0.0]), torch.float16, bits)
    with pytest.raises(ValueError, match="NaN or infinite"):
        stochastic_round(torch.tensor([float("nan"), 0.0]), torch.float16, bits)
    with pytest.raises(ValueError, match="one random word per element"):
        stochastic_round(torch.zeros(3), torch.float16, bits)
    with pytest.raises(TypeError, match="at least as wide"):
        stochastic_round(torch.zeros(2, dtype=torch.float16), torch.float32, bits)
    with pytest.raises(ValueError, match="residual_dtype"):
        CompactMaster({"w": torch.zeros(2)}, seed=0, residual_dtype=torch.int8)


# ------------------------------------------------------------------------------------------- the step
def quadratic(target: dict[str, torch.Tensor]):
    """L(θ) = Σ_n ½ Σ (θ_n - target_n)² · scale_n, evaluated in float64 (a smooth loss with a known gradient)."""
    def loss(params):
        return sum(0.5 * ((params[n].double() - t.double()) ** 2).sum() * (i + 1) for i, (n, t) in
                   enumerate(target.items()))
    return loss


def checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 13, generator=g).to(torch.bfloat16),
            "b": torch.randn(29, generator=g).to(torch.bfloat16)}


def test_fp32_master_step_is_the_textbook_mezo_step():
    """One step against MeZO written out in float64: θ' = θ - lr·((L(θ+εz) - L(θ-εz))/2ε)·z, z from zo2's stream."""
    ckpt, lr, eps, seed = checkpoint(), 1e-2, 1e-3, 5
    target = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(9)) for n, t in ckpt.items()}
    loss = quadratic(target)
    master = FP32Master(ckpt)
    plus, g = zo_step(master, loss, step=4, lr=lr, eps=eps, seed=seed)

    key = step_seed(seed, 4, 0)
    theta = {n: t.double() for n, t in ckpt.items()}
    z = {n: philox_fill_(torch.empty(t.shape), key, i).double() for i, (n, t) in enumerate(ckpt.items())}
    ref_plus = loss({n: t + eps * z[n] for n, t in theta.items()})
    ref_g = (ref_plus - loss({n: t - eps * z[n] for n, t in theta.items()})) / (2 * eps)
    # zo_step forms θ ± εz in fp32: each element off by ≤ ulp/2 ≈ 2^-24·|θ ± εz|, moving L± by ≤ Σ|∂L/∂θ|·that,
    # so g by ≤ that / ε (the two errors add); the update's own fp32 rounding adds ≤ 2^-24·|θ'|.
    slack = sum((((i + 1) * ((theta[n] - target[n].double()).abs() + eps * z[n].abs())) *
                 (theta[n].abs() + eps * z[n].abs())).sum() for i, n in enumerate(theta)) * 2.0**-24
    dg = float(2 * slack / (2 * eps))
    assert abs(g - float(ref_g)) <= dg
    assert abs(plus - float(ref_plus)) <= float(slack)
    for n in theta:
        ref = theta[n] - lr * float(ref_g) * z[n]
        bound = lr * dg * z[n].abs() + 2.0**-24 * ref.abs() * 2
        assert ((master.values()[n].double() - ref).abs() <= bound).all(), n


def test_compact_step_with_an_fp32_residual_is_the_fp32_step():
    """From a bf16 checkpoint, one step: θ = base + (0 − δ) rounds exactly as θ − δ, so the two agree bitwise."""
    ckpt = checkpoint()
    target = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for n, t in ckpt.items()}
    fp32, compact = FP32Master(ckpt), CompactMaster(ckpt, seed=3, residual_dtype=torch.float32)
    a = zo_step(fp32, quadratic(target), step=0, lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1)
    b = zo_step(compact, quadratic(target), step=0, lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1)
    assert a == b
    for n in ckpt:
        assert torch.equal(fp32.values()[n], compact.values()[n]), n
        assert not torch.equal(fp32.values()[n], ckpt[n].float()), n  # the step moved θ


def test_compact_trajectory_with_an_fp32_residual_is_the_fp32_trajectory():
    """With a zero base, θ = residual exactly at every step: 20 steps agree bitwise (losses, g and θ)."""
    zero = {n: torch.zeros_like(t) for n, t in checkpoint().items()}
    target = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for n, t in zero.items()}
    fp32, compact = FP32Master(zero), CompactMaster(zero, seed=3, residual_dtype=torch.float32)
    for step in range(20):
        a = zo_step(fp32, quadratic(target), step, lr=1e-2, eps=1e-3, seed=3)
        b = zo_step(compact, quadratic(target), step, lr=1e-2, eps=1e-3, seed=3)
        assert a == b, step
    for n in zero:
        assert torch.equal(fp32.values()[n], compact.values()[n]), n


def test_compact_master_keeps_updates_a_bf16_master_loses():
    """Updates of 1e-6 on weights of 1 (1/3900 of a bf16 half-ulp): a bf16 master stays put, the compact one moves by
    their sum in expectation (fp16 residual), reproducibly for a seed."""
    ckpt = {"w": torch.ones(20000, dtype=torch.bfloat16)}
    delta = {"w": torch.full((20000,), 1e-6)}
    rounded, compact, again = RoundedMaster(ckpt), CompactMaster(ckpt, seed=1), CompactMaster(ckpt, seed=1)
    for step in range(100):
        for m in (rounded, compact, again):
            m.apply_update(delta, step)
    assert torch.equal(rounded.values()["w"], ckpt["w"].float())
    assert torch.equal(compact.residual["w"], again.residual["w"])
    moved = compact.residual["w"].double().mean().item()
    # residual ≈ -1e-4: fp16 gap there 2^-24..2^-23 (≤ 1.2e-7); each of the 100 roundings adds independent error of
    # std ≤ gap/2, so the mean over 20000 elements has std ≤ 1.2e-7/2·√100/√20000 ≈ 4e-9: 6 std = 2.5e-8
    assert moved == pytest.approx(-1e-4, abs=2.5e-8)
