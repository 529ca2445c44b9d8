"""Parallel first touch of the host buffers (zo2.ring.first_touch, called by host_buffer): every page of a
buffer is resident after it, read from the kernel with mincore(2), and nothing outside it; the content is
unchanged; a pinned buffer is touched before it is registered; the block stores hold the model's values."""

import copy
import ctypes
import mmap
import pathlib

import pytest
import torch

import zo2
import zo2.ring
from zo2.ring import PAGE, anonymous_mapping, first_touch, host_buffer

from .conftest import tiny_opt

_libc = ctypes.CDLL(None, use_errno=True)


def resident(ptr: int, nbytes: int) -> list[bool]:
    """Residency of each page that [ptr, ptr + nbytes) overlaps, from mincore(2)."""
    start = ptr - ptr % PAGE
    npages = (ptr + nbytes - start + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * npages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(npages * PAGE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return [bool(v & 1) for v in vec]


@pytest.fixture
def fresh_mapping():
    """A fresh private anonymous mapping (no page resident yet) as a uint8 tensor, and its mapping."""
    held = []

    def make(npages: int) -> torch.Tensor:
        mapping = anonymous_mapping(npages * PAGE)
        # no transparent huge pages here: a huge page would make a whole 2 MiB resident on one touch
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        region = (ctypes.c_uint8 * (npages * PAGE)).from_buffer(mapping)
        held.append((mapping, region))
        flat = torch.frombuffer(region, dtype=torch.uint8)
        assert not any(resident(flat.data_ptr(), flat.numel()))
        return flat

    yield make


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_page_of_the_buffer_and_no_other_is_touched(fresh_mapping, monkeypatch, threads):
    monkeypatch.setattr(zo2.ring, "TOUCH_CHUNK_PAGES", 3)  # many tasks on a small buffer
    whole = fresh_mapping(40)
    lo, hi = PAGE + 100, 37 * PAGE + 7  # starts and ends inside a page: 37 pages overlapped, pages 1..37
    first_touch(whole[lo:hi], threads)
    assert resident(whole.data_ptr(), whole.numel()) == [1 <= i <= 37 for i in range(40)]
    assert torch.count_nonzero(whole) == 0  # a fresh mapping reads zero: only rewritten with its own value


def test_the_content_is_unchanged(monkeypatch):
    monkeypatch.setattr(zo2.ring, "TOUCH_CHUNK_PAGES", 2)
    data = torch.randint(0, 256, (11 * PAGE + 333,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flat = data[17:].clone()
    first_touch(flat, 3)
    assert torch.equal(flat, data[17:])


def test_a_pageable_buffer_is_resident_when_returned():
    # 48 MiB: above glibc's largest mmap threshold (32 MiB), so a fresh mapping that nothing has touched
    flat = host_buffer(48 * 2**20 + 5, pin=False)
    assert all(resident(flat.data_ptr(), flat.numel()))


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="needs Linux")
def test_a_pinned_buffer_is_touched_before_it_is_registered(monkeypatch):
    seen = []
    monkeypatch.setattr(zo2.ring, "_register", lambda ptr, n: seen.append(all(resident(ptr, n))))
    monkeypatch.setattr(zo2.ring, "_unregister", lambda ptr, n: None)
    monkeypatch.setattr(zo2.ring, "TOUCH_CHUNK_PAGES", 5)
    flat = host_buffer(300 * PAGE + 1, pin=True)
    assert seen == [True]
    assert all(resident(flat.data_ptr(), flat.numel()))


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_block_stores_hold_the_models_values_and_are_resident(monkeypatch, amp):
    """Set-up with the parallel touch (its chunks small enough to split these stores over threads) gives
    the stores the model's values, bit for bit, as set-up without it does; every store went through the
    touch, and every page of it is resident after set-up."""
    monkeypatch.setattr(zo2.ring, "_register", lambda ptr, n: None)  # pin natively (hooks recorded)
    monkeypatch.setattr(zo2.ring, "_unregister", lambda ptr, n: None)
    real = zo2.engine.make_precision
    monkeypatch.setattr(zo2.engine, "make_precision", lambda dtype, index, pin, log: real(dtype, index, True, log))
    base = tiny_opt(num_hidden_layers=3, hidden_size=64, ffn_dim=512)  # blocks of 130+ KiB: tens of pages
    expected = [[p.detach().clone() for p in block.parameters()] for block in base.model.decoder.layers]
    touch = zo2.ring.first_touch
    spans = []  # (start, end) of every buffer first_touch ran on

    def spy(flat, threads=None):
        spans.append((flat.data_ptr(), flat.data_ptr() + flat.numel()))
        touch(flat, threads)

    for touched in (False, True):
        if touched:
            monkeypatch.setattr(zo2.ring, "first_touch", spy)
            monkeypatch.setattr(zo2.ring, "TOUCH_CHUNK_PAGES", 3)
        else:
            monkeypatch.setattr(zo2.ring, "first_touch", lambda flat, threads=None: None)
        model = copy.deepcopy(base)
        engine = zo2.offload(model, zo2.ZOSGD(model.parameters(), lr=1e-3), device="cpu", amp=amp, verbose=False)
        for store, values in zip(engine.stores, expected, strict=True):
            for view, value in zip(store.master, values, strict=True):
                assert torch.equal(view, value)
            if touched:  # the whole store went through the touch, and every page of it is resident
                lo, hi = store.master_flat.data_ptr(), store.master_flat.data_ptr() + store.master_flat.numel()
                assert any(a <= lo and hi <= b for a, b in spans)
                assert all(resident(lo, hi - lo))
        engine.detach()
