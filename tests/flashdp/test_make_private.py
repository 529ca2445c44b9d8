"""make_private: refusals that name every module, parameter identity, state_dict keys, thresholds, LoRA-style
frozen bases, bad inputs, and the clipping bound as a hypothesis property."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import flashdp
import flashdp.dispatch


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.ones(1))


def test_unsupported_modules_all_listed_with_fix():
    with pytest.raises(flashdp.UnsupportedModuleError) as info:
        flashdp.make_private(Mixed(), 1.0, fallback=False)
    msg = str(info.value)
    for path in ["conv (Conv2d)", "bn (BatchNorm1d)", "<root> (Mixed)"]:
        assert path in msg
    assert "fc" not in [m[0] for m in info.value.modules]
    assert "requires_grad_(False)" in msg and "register_layer" in msg


def test_frozen_unsupported_modules_are_ignored_lora_style(ref):
    class LoRALinear(nn.Module):
        def __init__(self, d_in, d_out, r=2):
            super().__init__()
            self.base_layer = nn.Linear(d_in, d_out)
            self.lora_A = nn.Linear(d_in, r, bias=False)
            self.lora_B = nn.Linear(r, d_out, bias=False)
            self.base_layer.requires_grad_(False)
            nn.init.normal_(self.lora_B.weight)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 1)  # unsupported but frozen
            self.conv.requires_grad_(False)
            self.q = LoRALinear(3, 5)

        def forward(self, x):
            return self.q(self.conv(x.transpose(1, 2)).transpose(1, 2))

    model = Net()
    x = torch.randn(4, 6, 3)
    want, _, groups = ref.per_sample_clipped_sum(model, lambda m, b: m(x[b:b + 1].double()).pow(2).mean(), 4, 0.3)
    assert len(groups) == 2
    flashdp.make_private(model, 0.3)
    model(x).pow(2).sum().div(x.shape[0] * 30).backward()
    ref.assert_grads_close(model, want)
    assert model.q.base_layer.weight.grad is None


def test_parameters_and_state_dict_keys_kept():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    ids = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    flashdp.make_private(model, 1.0)
    assert [id(p) for p in model.parameters()] == ids
    assert list(model.state_dict()) == keys
    assert isinstance(model[2], nn.Linear) and isinstance(model[2], flashdp.DPLinear)
    flashdp.make_private(model, 2.0)  # again: allowed, re-records thresholds
    assert flashdp.privacy_state(model).max_grad_norm == 2.0


def test_default_and_per_group_thresholds():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    flashdp.make_private(model, 2.0)
    assert [g.max_norm for g in flashdp.privacy_state(model).groups] == [1.0] * 4  # C/√L
    flashdp.make_private(model, 2.0, group_max_grad_norms={"1": 0.25})
    assert [g.max_norm for g in flashdp.privacy_state(model).groups] == [1.0, 0.25, 1.0, 1.0]
    flashdp.make_private(model, 2.0, group_max_grad_norms=lambda name: 0.5 if name == "3" else None)
    assert flashdp.privacy_state(model).groups[3].max_norm == 0.5
    with pytest.raises(ValueError, match="threshold"):
        flashdp.make_private(model, 2.0, group_max_grad_norms={"0": -1.0})


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_max_grad_norm(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        flashdp.make_private(nn.Linear(2, 2), bad)


def test_input_without_batch_dimension():
    model = nn.Sequential(nn.Linear(3, 2))
    flashdp.make_private(model, 1.0)
    with pytest.raises(flashdp.FlashDPError, match="batch dimension"):
        model(torch.randn(3))
    emb = nn.Sequential(nn.Embedding(5, 2))
    flashdp.make_private(emb, 1.0)
    with pytest.raises(flashdp.FlashDPError, match="batch dimension"):
        emb(torch.tensor(1))


def test_batch_size_mismatch_between_layers_is_an_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):  # sequence-first reshuffle: dim 0 of b's input is not the batch
            return self.b(self.a(x).transpose(0, 1))

    model = Bad()
    flashdp.make_private(model, 1.0)
    with pytest.raises(flashdp.FlashDPError, match="dim 0"):
        model(torch.randn(4, 5, 3)).sum().backward()


def test_parameter_used_outside_its_dp_layer_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            # a direct use of fc's weight that flashdp.takeover's source scan cannot see (a plain attribute read
            # would be taken over by the fallback): would not be clipped
            return self.fc(x) + x @ getattr(self, "f" + "c").weight

    model = Sneaky()
    flashdp.make_private(model, 1.0)
    with pytest.raises(flashdp.FlashDPError, match="outside a DP layer"):
        model(torch.randn(2, 3)).sum().backward()
    flashdp.make_private(model, 1.0)  # again: the old hooks go, new ones come
    with pytest.raises(flashdp.FlashDPError, match="outside a DP layer"):
        model(torch.randn(2, 3)).sum().backward()



def test_tensor_swapped_behind_a_module_attribute_is_followed():
    """FSDP2 swaps the tensor behind ``module.weight`` (sharded at rest, unsharded in forward): the clip groups,
    the outside-DP check and DPOptimizer follow the module attribute and the parameter's name."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    flashdp.make_private(model, 1.0)
    for mod in model:
        for name in ("weight", "bias"):
            mod._parameters[name] = nn.Parameter(mod._parameters[name].detach().clone())
    state = flashdp.privacy_state(model)
    assert [id(p) for g in state.groups for p in g.params] == [id(p) for p in model.parameters()]
    assert sorted(state.param_names.values()) == sorted(n for n, _ in model.named_parameters())
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=2)
    model(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    with pytest.raises(flashdp.FlashDPError, match=r"'0\.weight' received a gradient from autograd outside a DP"):
        (model(torch.randn(2, 3)).sum() + model[0].weight.sum()).backward()

def test_all_names_resolve():
    for name in flashdp.__all__:
        assert getattr(flashdp, name) is not None


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 6), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       V=st.integers(2, 7), log_scale=st.floats(-3, 3), C=st.floats(0.01, 10.0),
       path=st.sampled_from(["once", "ghost", "direct"]))
def test_no_sample_exceeds_its_threshold(B, T, d_in, d_out, V, log_scale, C, path):
    """Each sample's clipped contribution to each group has norm ≤ C_l, whatever the input."""
    torch.manual_seed(B * 1000 + T * 100 + d_in * 10 + d_out)
    emb = nn.Embedding(V, d_in)
    lin = nn.Linear(d_in, d_out)
    ln = nn.LayerNorm(d_out)
    head = nn.Linear(d_out, V, bias=False)
    model = nn.Sequential(emb, lin, ln, head)
    model[3].weight = nn.Parameter(torch.randn(V, d_out))
    flashdp.make_private(model, C)
    groups = flashdp.privacy_state(model).groups
    ids = torch.randint(0, V, (B, T))
    w = torch.randn(B, T, V) * 10**log_scale
    for b in range(B):  # only sample b's loss: p.grad is exactly its clipped contribution
        model.zero_grad()
        with flashdp.dispatch.force_path(path):
            (model(ids) * w)[b].sum().backward()
        for g in groups:
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in g.params))
            assert norm <= g.max_norm * (1 + 1e-5) + 1e-7, (g.name, norm, g.max_norm)
