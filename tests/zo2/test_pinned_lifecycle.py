"""Pinned host memory's lifecycle (zo2.ring.host_buffer and the engine that owns the buffers), on the CPU
with the registration hooks recorded instead of calling CUDA:

- the range is unregistered while it is still mapped (unregistering after munmap races with another
  thread mapping the same addresses), read from /proc/self/maps at the moment of the call;
- the mapping is private and anonymous, advised for transparent huge pages (VmFlags ``hg``);
- ``engine.detach()`` leaves no block parameter pointing into a host store, and dropping the engine frees
  (unregisters) every pinned buffer at once, without the cycle collector: no reference cycle holds them.
"""

import gc
import pathlib
import weakref

import pytest
import torch

import zo2
import zo2.engine
import zo2.ring

from .conftest import tiny_opt


def mapping_of(ptr: int, nbytes: int) -> tuple[str, str] | None:
    """(permissions, VmFlags) of the mapping that holds [ptr, ptr + nbytes), or None if nothing maps it."""
    found = None
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            found = head[1] if lo <= ptr and ptr + nbytes <= hi else None
        elif found is not None and line.startswith("VmFlags:"):
            return found, line
    return None


@pytest.fixture
def fake_pinning(monkeypatch):
    """Record register / unregister calls with the state of the range at that moment."""
    if not pathlib.Path("/proc/self/smaps").exists():
        pytest.skip("needs /proc/self/smaps (Linux)")
    # earlier tests' buffers still held in reference cycles are freed now, under the real hooks: a later
    # gc.collect() would run their finalizers through the recorders and add foreign addresses
    gc.collect()
    calls = []
    monkeypatch.setattr(zo2.ring, "_register", lambda ptr, n: calls.append(("register", ptr, n, mapping_of(ptr, n))))
    monkeypatch.setattr(zo2.ring, "_unregister",
                        lambda ptr, n: calls.append(("unregister", ptr, n, mapping_of(ptr, n))))
    return calls


def test_pinned_buffer_is_unregistered_while_still_mapped(fake_pinning):
    flat = zo2.ring.host_buffer(10_000, pin=True)
    view = flat[5:]
    del flat
    assert [c[0] for c in fake_pinning] == ["register"]  # a view still holds the memory
    ptr, n = fake_pinning[0][1:3]
    del view
    assert [c[:3] for c in fake_pinning] == [("register", ptr, n), ("unregister", ptr, n)]
    assert fake_pinning[1][3] is not None, "unregistered after the range was unmapped"


def test_pinned_buffer_is_private_anonymous_and_advised_for_huge_pages(fake_pinning):
    flat = zo2.ring.host_buffer(3 * zo2.ring.PAGE + 1, pin=True)
    perms, flags = mapping_of(flat.data_ptr(), flat.numel())
    assert perms.endswith("p"), f"{perms}: a shared mapping gets no transparent huge pages"
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert " hg" in flags, flags  # MADV_HUGEPAGE


def offloaded(monkeypatch, amp):
    """A tiny model offloaded on the CPU with its host stores pinned (through the recorded hooks)."""
    real = zo2.engine.make_precision
    monkeypatch.setattr(zo2.engine, "make_precision", lambda dtype, index, pin, log: real(dtype, index, True, log))
    model = tiny_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=1)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, verbose=False)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    return model, opt, engine


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_detached_parameters_do_not_point_into_the_host_stores(monkeypatch, fake_pinning, amp):
    model, opt, engine = offloaded(monkeypatch, amp)
    flats = [store.master_flat for store in engine.stores]
    opt.flush()
    expected = [p.detach().clone() for p in model.parameters()]
    engine.detach()
    for flat in flats:
        flat.fill_(0x7F)  # the old host stores change: a parameter still in them would change too
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)
    del flats


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_dropping_a_detached_engine_frees_its_pinned_buffers_without_the_cycle_collector(monkeypatch, fake_pinning,
                                                                                           amp):
    model, _opt, engine = offloaded(monkeypatch, amp)  # the optimizer stays alive: it must not hold the engine
    registered = {c[1] for c in fake_pinning if c[0] == "register"}
    assert len(registered) == (3 if amp is None else 0)  # the masters are pinned natively, pageable under AMP
    engine.detach()
    gc.collect()
    gc.disable()
    try:
        ref = weakref.ref(engine)
        del engine
        assert ref() is None, "a reference cycle keeps the engine alive"
        assert {c[1] for c in fake_pinning if c[0] == "unregister"} == registered
    finally:
        gc.enable()
    loss = model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits  # a plain model again
    assert torch.isfinite(loss).all()
