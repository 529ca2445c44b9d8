"""Accounting and Poisson sampling: values match Opacus's own published regression values."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import flashdp


@pytest.mark.parametrize("mechanism, steps, want", [("rdp", int(90 / 0.04), 7.32911117143),
                                                    ("prv", int(90 // 0.04), 6.777395712150674)])
def test_epsilon_regression(mechanism, steps, want):
    # opacus/tests/accountants_test.py: σ=1.5, q=0.04, 90 epochs (its PRV test uses 90 // 0.04 = 2249 steps), δ=1e-5
    acct = flashdp.PrivacyAccountant(mechanism)
    assert acct.epsilon(1e-5) == 0.0
    for _ in range(steps):
        acct.step(noise_multiplier=1.5, sample_rate=0.04)
    assert acct.steps == steps
    assert acct.epsilon(1e-5) == pytest.approx(want, rel=1e-6)
    sd = acct.state_dict()
    other = flashdp.PrivacyAccountant("rdp")
    other.load_state_dict(sd)
    assert other.epsilon(1e-5) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("mechanism, kw, want", [
    ("rdp", {"epochs": 90}, 1.416), ("rdp", {"steps": 2000}, 1.3562),
    ("prv", {"epochs": 90}, 1.34765625), ("prv", {"steps": 2000}, 1.2915),
])
def test_noise_multiplier_regression(mechanism, kw, want):
    sigma = flashdp.get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, mechanism=mechanism,
                                         **kw)
    assert sigma == pytest.approx(want, abs=1e-4)


def test_bad_accounting_inputs():
    with pytest.raises(ValueError, match="mechanism"):
        flashdp.PrivacyAccountant("moments")
    with pytest.raises(ValueError, match="delta"):
        flashdp.PrivacyAccountant().epsilon(0.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        flashdp.get_noise_multiplier(target_epsilon=0, target_delta=1e-5, sample_rate=0.1, steps=10)


def test_poisson_loader_sizes_and_empty_batches():
    ds = TensorDataset(torch.randn(40, 3), torch.arange(40))
    gen = torch.Generator().manual_seed(0)
    loader = flashdp.poisson_loader(ds, expected_batch_size=2, generator=gen)
    sizes = [x.shape[0] for x, _ in loader]
    assert len(sizes) == 20
    assert 0 in sizes  # q = 0.05 over 40 samples: empty batches occur, as tensors with a 0 batch dim
    assert 1.0 < sum(sizes) / len(sizes) < 3.5
    loader2 = flashdp.poisson_loader(DataLoader(ds, batch_size=4))
    assert loader2.sample_rate == pytest.approx(0.1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        flashdp.poisson_loader(ds, expected_batch_size=0)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_no_largest_alpha_warning(mechanism, recwarn):
    """Where Opacus alone warns "Optimal order is the largest alpha" (its σ search passes σ = 20, whose best RDP
    order is beyond its largest default, 63; the PRV accountant bounds its domain with those orders), flashdp
    does not, and its ε is the same (PRV) or tighter (RDP: the minimum over more orders)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier as opacus_sigma

    setting = dict(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.125, epochs=2)
    with pytest.warns(UserWarning, match="largest alpha"):  # the premise
        want = opacus_sigma(**setting, accountant=mechanism)
    recwarn.clear()
    sigma = flashdp.get_noise_multiplier(**setting, mechanism=mechanism)
    acct = flashdp.PrivacyAccountant(mechanism)
    for _ in range(16):
        acct.step(noise_multiplier=5.0, sample_rate=0.01)
    eps = acct.epsilon(1e-5)
    assert not [w for w in recwarn if "largest alpha" in str(w.message)]
    if mechanism == "prv":
        assert sigma == want
    else:  # a tighter bound needs no more noise; here the best order of the target σ is inside both ranges
        assert sigma <= want
        default = RDPAccountant()
        default.history = [(5.0, 0.01, 16)]  # best order 128: beyond Opacus's 63, inside RDP_ALPHAS
        with pytest.warns(UserWarning, match="largest alpha"):
            assert 0 < eps < default.get_epsilon(delta=1e-5)
