"""Per-model running state: two private models in two threads keep their own batch sizes and backward
bookkeeping, and a backward pass leaves nothing behind."""

import copy
import threading

import pytest
import torch
from torch import nn

import flashdp
from flashdp.runtime import MAX_OPEN_PASSES


class _Rendezvous(nn.Module):
    """Waits for the other thread's model to reach the same point, so the two forwards overlap."""

    barrier: threading.Barrier | None = None  # set after the reference (deepcopy) is computed

    def forward(self, x):
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        return x


class _Flattening(nn.Module):
    """Reads its (B, T, d) input as B·T rows (as OPT's decoder layers do): needs the model's batch size."""

    def __init__(self, d=4):
        super().__init__()
        self.wait = _Rendezvous()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        x = self.wait(x)  # both models' forwards have started
        y = self.fc(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.wait(y)  # both layers ran while both forwards were open


def test_two_models_in_two_threads_keep_their_own_batch_sizes(ref):
    models = [_Flattening(), _Flattening()]
    batches = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]
    wants = []
    for m, x in zip(models, batches, strict=True):
        want, _, _ = ref.per_sample_clipped_sum(m, lambda mm, b, x=x: mm(x[b:b + 1].double()).pow(2).mean(),
                                                x.shape[0], 0.5)
        wants.append(want)
        flashdp.make_private(m, 0.5)
    barrier = threading.Barrier(2)
    for m in models:
        m.wait.barrier = barrier
    errors = []

    def run(i):
        try:
            x = batches[i]
            models[i](x).pow(2).mean().backward()
        except Exception as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for m, want in zip(models, wants, strict=True):
        ref.assert_grads_close(m, want)


def test_backward_leaves_no_pass_record():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    flashdp.make_private(model, 1.0)
    runtime = flashdp.privacy_state(model).runtime
    model(torch.randn(2, 3)).sum().backward()
    assert runtime._passes == {} and runtime.model_batch() is None


def test_records_of_passes_that_raised_are_bounded():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):  # dim 0 of b's input is not the batch: the backward pass raises
            return self.b(self.a(x).transpose(0, 1))

    model = Bad()
    flashdp.make_private(model, 1.0)
    runtime = flashdp.privacy_state(model).runtime
    for _ in range(MAX_OPEN_PASSES + 3):
        with pytest.raises(flashdp.FlashDPError, match="dim 0"):
            model(torch.randn(4, 5, 3)).sum().backward()
    assert len(runtime._passes) <= MAX_OPEN_PASSES


def test_deepcopy_of_a_private_model_gets_its_own_runtime():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    flashdp.make_private(model, 0.5)
    twin = copy.deepcopy(model)
    assert flashdp.privacy_state(twin).runtime is not flashdp.privacy_state(model).runtime
    x = torch.randn(5, 3)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    state = flashdp.privacy_state(twin)
    assert [id(p) for g in state.groups for p in g.params] == [id(p) for p in twin.parameters()]  # the copy's
    assert state.model_ref() is twin
    opt = flashdp.DPOptimizer(torch.optim.SGD(twin.parameters(), lr=1.0), noise_multiplier=0.0, expected_batch_size=5)
    opt.step()
    assert opt.privacy is state


def _grad_seen_inside_backward(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the Linear's clipped sum is in .grad when its input's gradient arrives (inside the pass), not
    only at the end of the pass."""
    x = x.clone().requires_grad_(True)
    seen = []
    x.register_hook(lambda g: seen.append(model[0].weight.grad is not None))
    model(x).sum().backward()
    return seen[0]


def test_dropped_forward_does_not_hold_back_clipping():
    """A group clips as soon as every live forward call has handed in its use: a forward whose output was
    dropped without a backward is not waited for (under FSDP2 waiting until the pass ends would be too late)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    flashdp.make_private(model, 1.0)
    x = torch.randn(2, 3)
    model(x)  # grad mode on, output dropped: its graph, and the call it recorded, are freed
    assert _grad_seen_inside_backward(model, x)
    model.zero_grad()
    kept = model(x)  # alive and never backpropagated: the group waits for it until the pass ends
    assert not _grad_seen_inside_backward(model, x)
    assert model[0].weight.grad is not None
    del kept
