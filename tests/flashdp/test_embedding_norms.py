"""The embedding's per-sample norms on CUDA (a sort instead of torch.unique, which syncs the host once per
backward), run here on CPU against the CPU path and an independent per-sample float64 loop."""

import pytest
import torch

from flashdp.layers_embedding import EmbeddingUse, pair_sq_norms_sorted


def _reference(ids: torch.Tensor, G: torch.Tensor, V: int) -> torch.Tensor:
    """float64, sample by sample: the dense (V, d) gradient of each sample, its squared norm."""
    out = []
    for b in range(ids.shape[0]):
        dense = torch.zeros(V, G.shape[-1], dtype=torch.float64)
        dense.index_add_(0, ids[b], G[b].double())
        out.append(dense.square().sum())
    return torch.stack(out)


@pytest.mark.parametrize("B,T,V,d", [(3, 11, 7, 5), (1, 1, 1, 1), (4, 33, 1000, 3), (2, 50, 2, 4)])
def test_sorted_path_equals_the_cpu_path_and_the_reference(B, T, V, d):
    g = torch.Generator().manual_seed(B * T + V)
    ids = torch.randint(0, V, (B, T), generator=g)
    G = torch.randn(B, T, d, generator=g)
    weight = torch.empty(V, d)
    cpu = EmbeddingUse(ids, G, weight).sq_norms()
    keys = (torch.arange(B)[:, None] * V + ids).reshape(-1)
    cuda_branch = pair_sq_norms_sorted(keys, G.reshape(-1, d), V, torch.zeros(B))
    # the stable sort sums each (sample, id)'s rows in row order, as unique's inverse index does: same bits
    assert torch.equal(cuda_branch, cpu)
    # fp32 sums of ≤ T rows then ≤ T squares: ≤ 2T·2^-24 relative, far below 1e-5 at T ≤ 50
    torch.testing.assert_close(cuda_branch.double(), _reference(ids, G, V), rtol=1e-5, atol=0)


def test_the_cuda_branch_is_taken_for_cuda_keys(monkeypatch):
    """EmbeddingUse sends CUDA tensors to the sorted path and never calls torch.unique there."""
    import flashdp.layers_embedding as E

    calls = []
    monkeypatch.setattr(E, "pair_sq_norms_sorted", lambda keys, G, V, sq: calls.append(V) or sq)

    class CudaLooking(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    def no_unique(*a, **k):
        raise AssertionError("torch.unique on the CUDA branch")

    monkeypatch.setattr(torch, "unique", no_unique)
    ids = torch.randint(0, 9, (2, 4)).as_subclass(CudaLooking)
    EmbeddingUse(ids, torch.randn(2, 4, 3), torch.empty(9, 3)).sq_norms()
    assert calls == [9]
