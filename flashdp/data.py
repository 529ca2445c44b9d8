"""Poisson sampling of batches (each sample joins a batch independently with probability q), via Opacus.

Batches have a random size with mean ``q·N``; an empty batch comes out as tensors with a leading 0
dimension (Opacus's collate), which DP layers accept. With an empty batch you may also skip the forward
and backward passes, but still call ``DPOptimizer.step()``: the noise of that step must be added.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["poisson_loader"]


def poisson_loader(data: Dataset | DataLoader, *, sample_rate: float | None = None,
                   expected_batch_size: int | None = None, generator: torch.Generator | None = None,
                   **kwargs) -> DataLoader:
    """A data loader drawing Poisson-sampled batches (Opacus ``DPDataLoader``).

    Args:
        data: a dataset, or a DataLoader whose dataset, collate_fn and workers are reused.
        sample_rate: q; or give ``expected_batch_size`` (q = expected_batch_size / len(dataset)); from a
            DataLoader, its batch size is the expected batch size by default.
        generator: seeds the sampling (Opacus uses a secure generator when you pass one from secure mode).
        kwargs: passed to DPDataLoader when ``data`` is a dataset (collate_fn, num_workers, ...).

    Returns:
        The loader; ``len(loader)`` steps make one expected epoch.
    """
    from opacus.data_loader import DPDataLoader  # imported on first use (slow import)

    if isinstance(data, DataLoader):
        if sample_rate is not None or expected_batch_size is not None:
            n = len(data.dataset)
            q = sample_rate if sample_rate is not None else expected_batch_size / n
            return DPDataLoader(data.dataset, sample_rate=_check_rate(q), collate_fn=data.collate_fn,
                                generator=generator, num_workers=data.num_workers)
        return DPDataLoader.from_data_loader(data, generator=generator)
    n = len(data)
    if sample_rate is None:
        if expected_batch_size is None:
            raise ValueError("flashdp.poisson_loader: give sample_rate or expected_batch_size")
        if expected_batch_size <= 0:
            raise ValueError(f"flashdp.poisson_loader: expected_batch_size must be > 0, got {expected_batch_size}")
        sample_rate = expected_batch_size / n
    return DPDataLoader(data, sample_rate=_check_rate(sample_rate), generator=generator, **kwargs)


def _check_rate(q: float) -> float:
    if not 0 < q <= 1:
        raise ValueError(f"flashdp.poisson_loader: sample_rate must be in (0, 1], got {q}")
    return float(q)
