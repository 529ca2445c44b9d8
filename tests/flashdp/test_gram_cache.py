"""The X Gram cache of flashdp's Linear layers (q/k/v, gate/up read one input): one Gram per input and pass, on
every device (it was CPU-only, so CUDA recomputed it per projection)."""

import torch

from flashdp.layers_linear import _GRAM_CACHE_BYTES, _x_gram
from memtrain.kernels.dp_linear_norms import gram


class CudaLooking(torch.Tensor):
    """A CPU tensor that reports a CUDA device: the cache's own decisions, without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_the_cache_serves_cuda_inputs():
    X = torch.randn(3, 37, 8).as_subclass(CudaLooking)
    assert X.device.type == "cuda"
    scratch: dict = {}
    first = _x_gram(X, scratch)
    assert first is not None and _x_gram(X, scratch) is first  # the second projection reuses it
    ref = gram(X.as_subclass(torch.Tensor)).full()
    assert torch.equal(first.full().as_subclass(torch.Tensor), ref)


def test_a_changed_or_different_input_gets_its_own_gram():
    X = torch.randn(2, 9, 4)
    scratch: dict = {}
    first = _x_gram(X, scratch)
    X.mul_(2)  # same storage, new version: the cached Gram is stale
    second = _x_gram(X, scratch)
    assert second is not first and torch.allclose(second.full(), 4 * first.full())
    assert _x_gram(X.clone(), scratch) is not second
    assert len(scratch["x_gram"]) == 2  # the last two inputs only


def test_past_the_size_bound_nothing_is_cached():
    T = int((_GRAM_CACHE_BYTES / 4) ** 0.5) + 1  # one sample's fp32 T x T Gram is past the bound
    X = torch.empty(1, T, 1)
    assert _x_gram(X, {}) is None
