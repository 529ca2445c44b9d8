"""DPOptimizer's noise against its definition (flashdp/noise.py), regenerated independently: the step key from
the SplitMix64 formula written out here, z from memtrain.testing's NumPy Philox, the stream of each parameter
from its position in named_parameters(); per-group thresholds; secure mode; shards by global offset."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import flashdp
from flashdp import noise
from memtrain.testing import philox_noise_numpy

M64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _step_key(seed, t):
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ t) ^ 0)


def _z(keys, stream, n, offset=0):
    return sum(philox_noise_numpy(k, stream, n, offset) for k in keys)


class Net(nn.Module):
    """Tied embedding/head, a frozen layer in between, a LayerNorm, odd sizes."""

    def __init__(self, V=37, d=11):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.ln = nn.LayerNorm(d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.ln(self.frozen(self.emb(ids)))))


# Streams: position among the trainable parameters in named_parameters() order, a tied parameter counted once.
STREAMS = {"emb.weight": 0, "ln.weight": 1, "ln.bias": 2, "mid.weight": 3, "mid.bias": 4}


class _Recording(torch.optim.SGD):
    """Records the gradients it is asked to apply, and applies nothing."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def _noisy_steps(model, sigma, B, seed, steps, secure=False, **make_kwargs):
    """The noise of each step, from all-zero clipped sums: (what the inner optimizer receives) × B, by name."""
    flashdp.make_private(model, 2.0, **make_kwargs)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    inner = _Recording([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt = flashdp.DPOptimizer(inner, noise_multiplier=sigma, expected_batch_size=B, seed=seed, secure_mode=secure)
    out = []
    for _ in range(steps):
        opt.step()  # no backward: every clipped sum is 0 (an empty Poisson batch)
        out.append({n: g.double() * B for n, g in zip(names, inner.seen, strict=True)})
        opt.zero_grad()
    return out, flashdp.privacy_state(model)


def _tol(std):
    # |z_kernel - z_ref| <= 2e-6 (fp32 Box-Muller against float64, tests/kernels/test_philox.py); then the fp32
    # roundings of std·z and of ÷B: 2 relative roundings of |std·z| <= 6·std (×B here is exact in float64)
    return std * (2e-6 + 2 * 2**-24 * 6)


def test_noise_is_the_documented_philox_stream():
    torch.manual_seed(0)
    model = Net()
    sigma, B, seed = 1.3, 7, 1234
    steps, state = _noisy_steps(model, sigma, B, seed, 2)
    c_total = 2.0  # groups: emb+head (tied), ln, mid, each C/√3: C_total = √(3·C²/3) = C = 2
    assert {state.param_names[k]: v for k, v in state.stream_ids.items()} == STREAMS
    for t, got in enumerate(steps):
        for name, g in got.items():
            want = sigma * c_total * _z([_step_key(seed, t)], STREAMS[name], g.numel()).reshape(g.shape)
            err = (g.numpy() - want).__abs__().max()
            assert err <= _tol(sigma * c_total), (t, name, err)


def test_noise_is_calibrated_to_the_whole_sensitivity_with_overridden_thresholds():
    """Overridden thresholds: every group's noise std is σ·C_total, C_total = √(Σ_g C_g²) (not σ·C_g)."""
    torch.manual_seed(0)
    model = Net()
    sigma, B, seed = 0.8, 5, 99
    overrides = {"ln": 0.05, "head": 3.0}  # 'head' names the tied emb+head group
    (got,), state = _noisy_steps(model, sigma, B, seed, 1, group_max_grad_norms=overrides)
    assert sorted(g.max_norm for g in state.groups) == sorted([3.0, 0.05, 2.0 / math.sqrt(3)])
    c_total = math.sqrt(3.0**2 + 0.05**2 + 4.0 / 3)
    for name, g in got.items():
        z = _z([_step_key(seed, 0)], STREAMS[name], g.numel()).reshape(g.shape)
        err = np.abs(g.numpy() - sigma * c_total * z).max()
        assert err <= _tol(sigma * c_total), (name, err)


def test_secure_mode_is_four_csprng_keyed_normals_over_two(monkeypatch):
    """secure_mode: four fresh 64-bit keys per step from the CSPRNG, (z1 + z2 + z3 + z4) / 2 per coordinate."""
    drawn = []

    def fake_randbits(k):
        assert k == 64
        drawn.append(int.from_bytes(np.random.default_rng(len(drawn)).bytes(8), "little"))
        return drawn[-1]

    monkeypatch.setattr(noise.secrets, "randbits", fake_randbits)
    torch.manual_seed(0)
    model = Net()
    sigma, B = 1.1, 3
    steps, _ = _noisy_steps(model, sigma, B, 5, 2, secure=True)
    assert len(drawn) == 8  # 4 keys per step, fresh each step
    c_total = 2.0
    for t, got in enumerate(steps):
        for name, g in got.items():
            want = sigma * c_total * _z(drawn[4 * t:4 * t + 4], STREAMS[name], g.numel()).reshape(g.shape) / 2
            # four |Δz| <= 2e-6, halved; fp32 roundings: 4 in the fused sum, 2 as in _tol, each <= 2^-24·(4·6/2)·std
            tol = sigma * c_total * (4 * 2e-6 / 2 + 6 * 2**-24 * 12)
            assert np.abs(g.numpy() - want).max() <= tol, (t, name)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_same_seed_same_noise_unless_secure(secure):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(_noisy_steps(Net(), 1.0, 4, 42, 1, secure=secure)[0][0])
    same = [torch.equal(runs[0][n], runs[1][n]) for n in runs[0]]
    assert (not any(same)) if secure else all(same)


def test_shard_with_global_offset_adds_its_part_of_the_whole_noise():
    """A shard holding rows [3, 7) of a (10, 13) gradient adds exactly those rows of the unsharded noise."""
    keys, std, stream = [noise.noise_keys(7, 3)[0]], 0.7, 2
    whole = noise.add_noise_(torch.zeros(10, 13), keys, std, stream)
    shard = noise.add_noise_(torch.zeros(4, 13), keys, std, stream, offset=3 * 13)
    assert torch.equal(shard, whole[3:7])
    transposed = torch.zeros(13, 10).t()  # a non-contiguous gradient: the stream follows the row-major index
    assert torch.equal(noise.add_noise_(transposed, keys, std, stream), whole)
    secure = [1, 2, 3, 4]
    assert torch.equal(noise.add_noise_(torch.zeros(4, 13), secure, std, stream, offset=39),
                       noise.add_noise_(torch.zeros(10, 13), secure, std, stream)[3:7])
    with pytest.raises(ValueError, match="1 or 4 keys"):
        noise.add_noise_(torch.zeros(3), [1, 2], std, stream)
