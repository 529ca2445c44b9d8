"""Host storage of offloaded blocks and the ring of device block buffers they stream through.

Each block's parameters live in one flat host buffer (allocated once), so an upload or an offload is
a single copy. On CUDA machines what crosses the bus is pinned at its exact size, page-rounded (not
through the caching host allocator's powers of two): the master natively, only the low-precision wire
copy of the block in flight under AMP (:func:`host_buffer`, :func:`store_allocations`,
:mod:`zo2.staging`). The device holds ``slots``
preallocated flat buffers; a resident block's parameters are views into its slot. On CUDA, uploads
run on their own stream, offloads on another, and the compute stream waits on CUDA events only: the
host never synchronises in the steady state. On CPU the same schedule runs with synchronous copies,
or on worker threads with real events (:mod:`zo2.copy_executor`, for the stream-ordering tests).
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from zo2.copy_executor import AsyncCopyExecutor, HostEvent

ALIGN = 256  # bytes: every tensor of a flat buffer starts on a 256-byte boundary


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class FlatLayout:
    """Byte offsets of a block's tensors in a flat buffer, for one dtype per tensor."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    offsets: list[int]
    nbytes: int

    @classmethod
    def of(cls, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> FlatLayout:
        offsets, pos = [], 0
        for t, dtype in zip(tensors, dtypes, strict=True):
            offsets.append(pos)
            pos = _aligned(pos + t.numel() * dtype.itemsize)
        return cls([t.shape for t in tensors], list(dtypes), offsets, pos)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of this layout as views into ``flat`` (a uint8 buffer of at least ``nbytes``)."""
        out = []
        for shape, dtype, off in zip(self.shapes, self.dtypes, self.offsets, strict=True):
            size = torch.Size(shape).numel() * dtype.itemsize
            out.append(flat[off:off + size].view(dtype).view(shape))
        return out


def wire_layout(params: list[torch.Tensor], amp_dtype: torch.dtype | None) -> FlatLayout:
    """The layout of a block as it crosses the bus: floating tensors in ``amp_dtype`` when given."""
    dtypes = [amp_dtype if amp_dtype is not None and p.is_floating_point() else p.dtype for p in params]
    return FlatLayout.of(params, dtypes)


PAGE = mmap.PAGESIZE


def pinned_nbytes(nbytes: int) -> int:
    """Host bytes a pinned buffer of ``nbytes`` takes: whole pages (page-aligned, registered as a unit)."""
    return (nbytes + PAGE - 1) // PAGE * PAGE


def _register(ptr: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` at ``ptr`` for the GPU (cudaHostRegister)."""
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"zo2.offload: cudaHostRegister of {nbytes} bytes failed (cudaError {int(err)}); the "
                           "host may limit locked memory (ulimit -l) or lack the memory: use amp=None, fewer "
                           "blocks, or free host memory")


def _unregister(ptr: int, nbytes: int) -> None:
    """Undo :func:`_register` (cudaHostUnregister); nothing to undo if CUDA was never initialised."""
    if torch.cuda.is_initialized():
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _release(ptr: int, nbytes: int, mapping: mmap.mmap) -> None:
    """Finalizer of a pinned buffer: unregister the range while ``mapping`` (held here) still maps it; the
    range is unmapped only after this returns, when the last reference to ``mapping`` goes."""
    _unregister(ptr, nbytes)


def anonymous_mapping(size: int) -> mmap.mmap:
    """A private anonymous mapping of ``size`` bytes (page-aligned), advised for transparent huge pages:
    pinning hundreds of GB in 4 KB pages takes minutes. (``mmap(-1, n)`` alone is MAP_SHARED, which
    transparent huge pages do not back.)"""
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


TOUCH_CHUNK_PAGES = 8192  # pages per first-touch task (32 MiB of 4 KiB pages): below torch's parallel grain, so
# each task runs on its own thread alone, and large enough that a task's cost hides the hand-off


def first_touch(flat: torch.Tensor, threads: int | None = None) -> None:
    """Fault in every page of the host buffer ``flat`` (a flat uint8 CPU tensor) on up to ``threads`` threads
    at once (None: ``torch.get_num_threads()``), by rewriting one byte of each page with its own value: the
    content is unchanged.

    Without it cudaHostRegister faults a pinned buffer's pages in on one thread, one page after another,
    all on that thread's NUMA node, and a pageable store's pages land wherever the thread that first
    writes them runs. Called on every host buffer as it is allocated (:func:`host_buffer`), before
    it is filled or registered; the memory it makes resident is the memory the buffer holds anyway."""
    n = flat.numel()
    if n == 0:
        return
    head = -flat.data_ptr() % PAGE  # bytes before the first page boundary inside the buffer
    with torch.no_grad():
        if head:
            flat[:1].bitwise_or_(0)  # the partial page the buffer starts in
        pages = flat[head::PAGE]  # the first byte of every page that starts inside the buffer
        chunks = [(lo, min(lo + TOUCH_CHUNK_PAGES, pages.numel()))
                  for lo in range(0, pages.numel(), TOUCH_CHUNK_PAGES)]
        workers = min(torch.get_num_threads() if threads is None else threads, len(chunks))
        if workers <= 1:
            pages.bitwise_or_(0)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="zo2-touch") as pool:  # torch ops release the GIL
            list(pool.map(lambda c: pages[c[0]:c[1]].bitwise_or_(0), chunks))


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 host buffer of exactly ``nbytes``; page-locked when ``pin`` (so that copies to the GPU
    are asynchronous).

    Pinned buffers do not come from ``torch.empty(pin_memory=True)``: the caching host allocator rounds
    them up to a power of two (a 810 MB block would take 1 GiB). They are a private anonymous mapping of
    :func:`pinned_nbytes` bytes (:func:`anonymous_mapping`) registered with cudaHostRegister. The tensor
    holds a ctypes view of the mapping, and the view holds the mapping: when the tensor's memory is freed,
    the view's finalizer unregisters the range first, and the mapping is unmapped after it (so no other
    thread can map the same addresses while they are still registered). Pageable buffers are plain
    ``torch.empty``. Either way the pages are faulted in by :func:`first_touch`, in parallel, before the
    buffer is registered or filled.
    """
    if not pin or nbytes == 0:
        flat = torch.empty(nbytes, dtype=torch.uint8)
        first_touch(flat)
        return flat
    size = pinned_nbytes(nbytes)
    mapping = anonymous_mapping(size)
    region = (ctypes.c_uint8 * size).from_buffer(mapping)  # keeps the mapping alive while it lives
    ptr = ctypes.addressof(region)
    flat = torch.frombuffer(region, dtype=torch.uint8, count=size)
    first_touch(flat)  # cudaHostRegister then locks pages that are already there instead of faulting each in
    _register(ptr, size)
    # runs when the last view of the memory is gone, before the mapping is unmapped; not at exit, where
    # the process frees it anyway
    weakref.finalize(region, _release, ptr, size, mapping).atexit = False
    return flat[:nbytes]


@dataclass(frozen=True)
class HostAllocation:
    """One host buffer of a block store or of the staging slots: its role, the bytes allocated for it, and
    whether it is pinned."""

    name: str
    nbytes: int
    pinned: bool


def store_allocations(master_bytes: int, amp: bool, pin: bool) -> list[HostAllocation]:
    """The host buffer of a block store, as :class:`BlockStore` allocates it and the plan counts it.

    Only what crosses the bus is pinned: natively the master itself; under AMP the fp32 master, which the
    host alone reads and writes, stays pageable (its low-precision copy lives in a staging slot only while
    in flight: :func:`staging_allocations`)."""
    pinned = pin and not amp
    return [HostAllocation("master", pinned_nbytes(master_bytes) if pinned else master_bytes, pinned)]


def staging_allocations(slots: int, wire_bytes: int, pin: bool) -> list[HostAllocation]:
    """The staging slots under AMP (:class:`zo2.staging.StagingRing`): ``slots`` buffers of the largest
    block's wire copy, pinned on CUDA."""
    return [HostAllocation("staging", pinned_nbytes(wire_bytes) if pin else wire_bytes, pin)] * slots


class BlockStore:
    """A block's host storage: ``master`` (its parameters in their own dtype; the fp32 master under AMP).

    ``wire_layout`` is the block as it crosses the bus; natively ``wire_flat`` is the master itself,
    under AMP it is None: the low-precision copy is written into a staging slot just before each upload
    (:mod:`zo2.staging`). ``allocations`` lists the host buffer as allocated (:func:`store_allocations`);
    ``casts`` counts the low-precision copies of the master made so far (AMP)."""

    def __init__(self, block: nn.Module, amp_dtype: torch.dtype | None, pin: bool) -> None:
        self.params: list[nn.Parameter] = list(block.parameters())  # each tensor once, tied or not
        self.master_layout = FlatLayout.of(self.params, [p.dtype for p in self.params])
        self.master_flat = host_buffer(self.master_layout.nbytes, pin and amp_dtype is None)
        self.master = self.master_layout.views(self.master_flat)
        with torch.no_grad():
            for view, p in zip(self.master, self.params, strict=True):
                view.copy_(p.data)
                p.data = view  # the original storage is freed here, one block at a time
        self.wire_layout = wire_layout(self.params, amp_dtype)
        self.wire_flat: torch.Tensor | None = self.master_flat if amp_dtype is None else None
        self.allocations = store_allocations(self.master_layout.nbytes, amp_dtype is not None, pin)
        self.casts = 0

    def attach(self, tensors: list[torch.Tensor]) -> None:
        """Point the block's parameters at ``tensors`` (device views while resident, master otherwise)."""
        for p, t in zip(self.params, tensors, strict=True):
            p.data = t

    def release(self) -> None:
        """Give the block's parameters their own memory holding the master's values (a plain module again)
        and drop this store's buffer, so that it is freed (and unregistered, if pinned) once unreferenced."""
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                p.data = m.clone()
        self.master, self.master_flat, self.wire_flat = [], torch.empty(0, dtype=torch.uint8), None


class Ring:
    """``slots`` preallocated device buffers and the copies in and out of them.

    The caller assigns slots round-robin. Ordering, the same on every backend:

    - an upload into a slot waits for the slot's previous offload (:meth:`release`) and for ``after``
      (the offload that last wrote its source);
    - the compute waits for a slot's upload (:meth:`wait_uploaded`) before using it;
    - an offload waits for the compute issued so far.

    On CUDA the copies run on an upload and an offload stream ordered by CUDA events. On the CPU they
    are synchronous unless ``executor`` (an :class:`~zo2.copy_executor.AsyncCopyExecutor`) runs them
    on worker threads, ordered by :class:`~zo2.copy_executor.HostEvent` s. ``before_copy(kind, slot)``
    (see :mod:`zo2.copy_executor`) runs before each copy, on the copy's stream: the delay hook of the
    stream-ordering tests.
    """

    def __init__(self, device: torch.device, slots: int, slot_bytes: int,
                 executor: AsyncCopyExecutor | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if executor is not None and self.cuda:
            raise ValueError("zo2 Ring: a CPU copy executor was given for a CUDA ring; CUDA copies run on "
                             "CUDA streams, pass executor=None")
        self.executor = executor
        self.before_copy: Callable[[str, int], None] | None = None
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        if self.cuda:
            self.upload_stream = torch.cuda.Stream(device)
            self.offload_stream = torch.cuda.Stream(device)
            self._uploaded: list = [torch.cuda.Event() for _ in range(slots)]
        else:
            self._uploaded = [HostEvent(done=True) for _ in range(slots)]
        self._freed: list = [None] * slots

    @property
    def slots(self) -> int:
        return len(self.buffers)

    def set_executor(self, executor: AsyncCopyExecutor | None) -> None:
        """Switch the CPU ring to ``executor`` (None: synchronous copies) after the copies in flight."""
        if self.cuda:
            raise ValueError("zo2 Ring: CUDA copies run on CUDA streams; a CPU executor cannot be set")
        self.synchronize()
        self.executor = executor

    def _delay(self, kind: str, slot: int) -> None:
        if self.before_copy is not None:
            self.before_copy(kind, slot)

    def upload(self, slot: int, source: torch.Tensor, after=None):
        """Copy the flat host buffer ``source`` into ``slot`` (asynchronously on CUDA or with an executor),
        after the slot's previous occupant has left it and after ``after`` (the offload that last wrote
        ``source``: a CUDA event, a HostEvent, or None). Returns the event that marks the end of the copy
        (None with synchronous CPU copies): ``source`` may be written again once it has happened."""
        n = source.numel()
        dest = self.buffers[slot][:n]
        waits = [e for e in (self._freed[slot], after) if e is not None]
        if self.cuda:
            with torch.cuda.stream(self.upload_stream):
                for event in waits:
                    self.upload_stream.wait_event(event)
                self._delay("upload", slot)
                dest.copy_(source, non_blocking=True)
                done = torch.cuda.Event()  # a fresh event per upload: a waiter on it never sees a later one
                done.record(self.upload_stream)
            self._uploaded[slot] = done
            return done
        if self.executor is None:
            self._delay("upload", slot)
            dest.copy_(source)
            return None

        def copy() -> None:
            self._delay("upload", slot)
            dest.copy_(source)

        self._uploaded[slot] = self.executor.upload.submit(waits, copy)
        return self._uploaded[slot]

    def wait_uploaded(self, slot: int) -> None:
        """Order the current (compute) stream after the upload into ``slot`` (on the CPU: block the
        computing thread until the copy has run)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._uploaded[slot])
        else:
            self._uploaded[slot].wait()

    def release(self, slot: int, destination: torch.Tensor | None):
        """Free ``slot`` after the compute issued so far; copy it back into ``destination`` first if given.
        Returns the event that marks the end of that copy (None with synchronous CPU copies)."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.offload_stream):
                self.offload_stream.wait_event(done)
                self._delay("offload", slot)
                if destination is not None:
                    destination.copy_(self.buffers[slot][:destination.numel()], non_blocking=True)
                freed = torch.cuda.Event()
                freed.record(self.offload_stream)
            self._freed[slot] = freed
            return freed
        if self.executor is None:
            self._delay("offload", slot)
            if destination is not None:
                destination.copy_(self.buffers[slot][:destination.numel()])
            return None
        source = self.buffers[slot]

        def copy() -> None:
            self._delay("offload", slot)
            if destination is not None:
                destination.copy_(source[:destination.numel()])

        # CPU compute is synchronous in the threads that issue it: what was issued so far has run
        freed = self.executor.offload.submit([HostEvent(done=True)], copy)
        self._freed[slot] = freed
        return freed

    def synchronize(self) -> None:
        """Wait for every copy in flight (before the host reads or writes the host store)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.executor is not None:
            self.executor.synchronize()
