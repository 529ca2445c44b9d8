"""Per-thread state across the offloaded halves: each half runs the closure on a worker thread, so what
torch or the user keeps per thread is either carried into every half or refused before anything moves
(zo2.halves.ThreadState documents the list)."""

import contextvars

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import zo2
from zo2.halves import ThreadStateError

USER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("USER_VAR", default="unset")


def offloaded(q: int = 2):
    """A two-block model whose forward allocates nothing without an explicit device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=1, num_perturbations=q)
    zo2.offload(model, opt, device="cpu", blocks=[model[0], model[2]], verbose=False)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 5, generator=g), torch.randn(3, 2, generator=g)
    return model, opt, x, y


def test_contextvars_are_carried_into_every_half_and_stay_there():
    model, opt, x, y = offloaded()
    seen = []

    def closure():
        seen.append(USER_VAR.get())
        USER_VAR.set("changed in a half")  # stays in this half's copy of the context
        return nn.functional.mse_loss(model(x), y)

    token = USER_VAR.set("set by the caller")
    try:
        opt.step(closure)
    finally:
        USER_VAR.reset(token)
    assert seen == ["set by the caller"] * 4
    assert USER_VAR.get() == "unset"


def test_default_dtype_is_shared_with_the_halves():
    """torch keeps the default dtype per process: every half sees the caller's."""
    model, opt, x, y = offloaded()
    seen = []

    def closure():
        seen.append(torch.get_default_dtype())
        return nn.functional.mse_loss(model(x), y)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt.step(closure)
    finally:
        torch.set_default_dtype(previous)
    assert seen == [torch.float64] * 4


def test_default_device_inference_mode_and_autocast_are_carried():
    """torch keeps these per thread; the halves reproduce the caller's."""
    model, opt, x, y = offloaded(q=1)
    seen = []

    def closure():
        seen.append((torch.get_default_device().type, torch.is_inference_mode_enabled(),
                     torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return nn.functional.mse_loss(model(x).float(), y)

    torch.set_default_device("meta")  # factory calls without a device now make meta tensors
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            opt.step(closure)
    finally:
        torch.set_default_device(None)
    assert seen == [("meta", True, torch.bfloat16)] * 2
    assert opt.step_count == 1 and opt.skipped_steps == 0


class Tagging(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Recording(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [Tagging, Recording], ids=["function-mode", "dispatch-mode"])
def test_per_thread_torch_modes_are_refused_before_anything_moves(mode):
    model, opt, x, y = offloaded()
    opt.step(lambda: nn.functional.mse_loss(model(x), y))  # an update is pending
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ThreadStateError, match=rf"under {mode.__name__}.*inside the closure"), mode():
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert opt.step_count == 1
    assert not opt.offload_engine.in_step and not opt.offload_engine.resident_slot
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def closure():  # the fix the error names
        with mode():
            return nn.functional.mse_loss(model(x), y)

    opt.step(closure)
    assert opt.step_count == 2
