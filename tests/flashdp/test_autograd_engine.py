"""The shim over torch's private autograd-engine calls: the semantics flashdp relies on hold on this torch,
and a torch that changes them gets a clear error, not an AttributeError deep inside backward."""

import pytest
import torch

from flashdp import _autograd_engine as engine
from flashdp.errors import FlashDPError


class _Probe(torch.autograd.Function):
    """Identity whose backward records the graph-task id and queues a callback."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        task = engine.current_graph_task_id()
        ctx.log.append(("backward", task))
        engine.queue_callback(lambda: ctx.log.append(("callback", task)))
        return g, None


def test_task_ids_and_end_of_pass_callbacks():
    """Each backward pass has its own id (>= 0; -1 outside), and a queued callback runs when that pass ends,
    after every backward function of the pass, before backward() returns."""
    assert engine.current_graph_task_id() == -1
    log: list = []
    x = torch.randn(3, requires_grad=True)
    _Probe.apply(_Probe.apply(x, log), log).sum().backward()
    assert [k for k, _ in log] == ["backward", "backward", "callback", "callback"]
    first = log[0][1]
    assert first >= 0 and all(t == first for _, t in log)
    log.clear()
    _Probe.apply(x, log).sum().backward()
    assert log[0][1] >= 0 and log[0][1] != first


def test_nested_backward_has_its_own_task():
    """A backward run inside another one's backward (reentrant checkpointing) is a different pass."""
    inner_log: list = []

    class Outer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            outer = engine.current_graph_task_id()
            with torch.enable_grad():
                y = torch.randn(2, requires_grad=True)
                _Probe.apply(y, inner_log).sum().backward()
            inner_log.append(("outer", outer))
            return g

    Outer.apply(torch.randn(2, requires_grad=True)).sum().backward()
    (_, inner), (_, _), (_, outer) = inner_log
    assert inner >= 0 and outer >= 0 and inner != outer


def test_changed_torch_api_gives_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    with pytest.raises(FlashDPError, match=r"torch .* changed the private autograd-engine API .*_graph_task_id"):
        engine.current_graph_task_id()


def test_changed_queue_callback_gives_a_clear_error(monkeypatch):
    class NoQueue:
        pass

    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", NoQueue())
    with pytest.raises(FlashDPError, match="queue_callback"):
        engine.queue_callback(lambda: None)
