"""The loss ZOSGD.step returns keeps the closure's dtype and device (a float64 model's loss is not
rounded to float32), in place and through zo2.offload, for a skipped step too."""

import math
import warnings

import pytest
import torch
from torch import nn

import zo2


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(5, 5) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return (x ** 2).mean()


@pytest.mark.parametrize("offloaded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_step_returns_the_closures_dtype_and_exact_value(offloaded, dtype):
    torch.manual_seed(0)
    model = Toy().to(dtype).eval()
    x = torch.randn(3, 5, dtype=torch.float64).to(dtype)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=1)
    if offloaded:
        zo2.offload(model, opt, device="cpu", verbose=False)
    seen = []

    def closure():
        loss = model(x)
        seen.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert loss.dtype == dtype and loss.device.type == "cpu" and loss.ndim == 0
    # one direction: the result is L+ itself, the first value the closure returned, unrounded
    assert loss.item() == seen[0]


def test_a_python_float_loss_gives_the_default_dtype():
    model = Toy()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=1)
    loss = opt.step(lambda: 0.25 + float(model(torch.ones(1, 5))))
    assert loss.dtype == torch.get_default_dtype()


def test_a_skipped_step_returns_the_closures_dtype():
    model = Toy().double()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zo2.NonFiniteLossWarning)
        loss = opt.step(lambda: model(torch.ones(1, 5, dtype=torch.float64)) * math.nan)
    assert loss.dtype == torch.float64 and math.isnan(loss.item())
