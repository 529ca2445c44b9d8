"""The layer registry: a toy layer registered with the public API alone (against the float64 per-sample loop,
tied use included), how targets match, and the supported-layer list in errors and docs/flashdp.md."""

import copy
import pathlib
import re

import pytest
import torch
from torch import nn

import flashdp
from flashdp import registry

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "flashdp.md"


# ------------------------------------------------------------------------------------------------------------
# A layer flashdp does not know, written by a user with the public API only.

class ScaledLinear(nn.Module):
    """``y = scale · x Wᵀ`` (no bias)."""

    def __init__(self, d_in: int, d_out: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.scale = scale

    def forward(self, x):
        return self.scale * x @ self.weight.t()


class ScaledLinearUse(flashdp.Use):
    """Sample b's gradient is ``scale · G_bᵀ X_b``: factored, so tied uses get their cross terms."""

    def __init__(self, G, X, weight, scale):
        self.G, self.X, self.weight, self.scale = G, X, weight, scale
        self.batch_size = G.shape[0]

    def _per_sample(self):
        return self.scale * torch.einsum("bto,bti->boi", self.G.float(), self.X.float())

    def sq_norms(self):
        return self._per_sample().square().sum((1, 2))

    def accumulate(self, coef):
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        self.weight.grad += torch.einsum("b,boi->oi", coef.float(), self._per_sample()).to(self.weight.dtype)

    def components(self):
        return [flashdp.Component(self.weight, "factored", left=self.scale * self.G, right=self.X)]


class ScaledLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, call):
        ctx.save_for_backward(x, weight)
        ctx.scale, ctx.call = scale, call
        return scale * x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        call = ctx.call
        call.add_use(ScaledLinearUse(call.flatten(grad_out), call.flatten(x), weight, ctx.scale))
        return ctx.scale * grad_out @ weight, None, None, None


class DPScaledLinear(ScaledLinear):
    def forward(self, x):
        call = flashdp.layer_call(self, x)
        if call is None:
            return super().forward(x)
        return ScaledLinearFunction.apply(x, self.weight, self.scale, call)


@pytest.fixture
def scaled_linear_registered():
    assert flashdp.register_layer(ScaledLinear, description="toy")(DPScaledLinear) is DPScaledLinear
    yield
    registry.unregister_layer(ScaledLinear)


class ToyNet(nn.Module):
    """Two ScaledLinear modules sharing one weight (one clip group, two uses), and one used twice."""

    def __init__(self, d=5):
        super().__init__()
        self.a = ScaledLinear(d, d, 0.5)
        self.b = ScaledLinear(d, d, 2.0)
        self.b.weight = self.a.weight
        self.c = ScaledLinear(d, d, 1.5)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.c(torch.tanh(self.c(h))))
        return self.b(h)


@pytest.mark.parametrize("seq", [False, True], ids=["2d", "3d"])
def test_toy_layer_registered_with_public_api_matches_per_sample_loop(ref, scaled_linear_registered, seq):
    torch.manual_seed(0)
    model = ToyNet()
    B = 6
    x = torch.randn(B, 3, 5) if seq else torch.randn(B, 5)
    x = x * torch.linspace(0.1, 2.0, B).view(B, *([1] * (x.dim() - 1)))  # some samples clipped, some not

    def loss(m, b):
        return m(x[b:b + 1].double()).pow(2).sum()

    _, norms, groups = ref.per_sample_clipped_sum(model, loss, B, 1e9)
    assert sorted(map(sorted, groups)) == [["a.weight"], ["c.weight"]]  # tied a/b: one group
    C = sorted(n for row in norms for n in row)[len(norms)] * 2**0.5  # a middle per-sample norm for C_l
    want, norms, _ = ref.per_sample_clipped_sum(model, loss, B, C)
    flashdp.make_private(model, C, loss_reduction="sum")
    assert isinstance(model.a, DPScaledLinear)
    model(x).pow(2).sum().backward()
    ref.assert_grads_close(model, want, rtol=1e-5, atol=1e-7)
    flat = [n for row in norms for n in row]
    assert min(flat) < C / 2**0.5 < max(flat), "test should mix clipped and unclipped samples"


def test_unregistered_toy_layer_is_refused_with_the_registry_list():
    with pytest.raises(flashdp.UnsupportedModuleError) as info:
        flashdp.make_private(ToyNet(), 1.0, fallback=False)
    msg = str(info.value)
    assert "a (ScaledLinear)" in msg and "register_layer" in msg
    for reg in registry.registrations():
        assert reg.label in msg


# ------------------------------------------------------------------------------------------------------------
# Matching rules.

class PlainSubclass(nn.Linear):
    pass


class OwnForward(nn.Linear):
    def forward(self, x):
        return x @ self.weight.t()  # uses the weight directly: must not be taken for an nn.Linear


def test_subclass_matches_only_without_its_own_forward():
    model = nn.Sequential(PlainSubclass(3, 3), OwnForward(3, 3))
    with pytest.raises(flashdp.UnsupportedModuleError) as info:
        flashdp.make_private(model, 1.0, fallback=False)
    assert [m[0] for m in info.value.modules] == ["1"]
    with pytest.warns(flashdp.FallbackWarning, match=r"1 \(OwnForward"):  # by default: the generic fallback
        flashdp.make_private(copy.deepcopy(model), 1.0)
    model[1].requires_grad_(False)
    flashdp.make_private(model, 1.0)
    assert isinstance(model[0], flashdp.DPLinear) and isinstance(model[0], PlainSubclass)
    assert type(model[0]).__name__ == "DPPlainSubclass"


def test_newest_registration_wins_and_unregister_restores(ref):
    calls = []

    @flashdp.register_layer(nn.Linear)
    def convert(module):  # the old converter-function form still works
        calls.append(module)
        module.__class__ = flashdp.DPLinear

    try:
        model = nn.Sequential(nn.Linear(2, 2))
        flashdp.make_private(model, 1.0)
        assert calls == [model[0]]
    finally:
        registry.unregister_layer(nn.Linear)
    flashdp.make_private(nn.Sequential(nn.Linear(2, 2)), 1.0)
    assert len(calls) == 1
    with pytest.raises(KeyError, match="nothing is registered"):
        registry.unregister_layer(OwnForward)


def test_registration_arguments_are_checked():
    with pytest.raises(ValueError, match="label"):
        flashdp.register_layer(lambda m: False, flashdp.DPLinear)
    with pytest.raises(TypeError, match="target"):
        flashdp.register_layer(3, flashdp.DPLinear)
    with pytest.raises(ValueError, match="keep_forward"):
        flashdp.register_layer(OwnForward, lambda m: None, keep_forward=True)


def test_make_private_again_keeps_converted_classes():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    flashdp.make_private(model, 1.0)
    classes = [type(m) for m in model]
    flashdp.make_private(model, 2.0)
    assert [type(m) for m in model] == classes


def test_two_private_models_share_no_state():
    m1, m2 = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    flashdp.make_private(m1, 1.0)
    flashdp.make_private(m2, 1.0)
    s1, s2 = flashdp.privacy_state(m1), flashdp.privacy_state(m2)
    assert s1.runtime is not s2.runtime
    assert all(g.runtime is s1.runtime for g in s1.groups) and all(g.runtime is s2.runtime for g in s2.groups)


# ------------------------------------------------------------------------------------------------------------
# The supported-layer list in docs/flashdp.md is the registry's.

def _doc_table() -> str:
    text = DOC.read_text()
    m = re.search(r"<!-- supported-layers:begin.*?-->\n(.*?)\n<!-- supported-layers:end -->", text, re.S)
    assert m, "docs/flashdp.md lost its generated supported-layers block"
    return m.group(1).strip()


def test_docs_supported_layers_equal_the_registry():
    builtin = [r for r in registry.registrations() if getattr(r.converter, "__module__", "").startswith("flashdp.")]
    assert builtin == registry.registrations(), "a test left a registration behind"
    assert _doc_table() == registry.supported_layers_markdown(), (
        "docs/flashdp.md's supported-layer table differs from the registry: paste the output of "
        "`python -c 'import flashdp.registry as r; print(r.supported_layers_markdown())'`")
