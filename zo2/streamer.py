"""The block streamer: which block occupies which ring slot, and the copies in and out of the ring.

During a step the streamer uploads blocks in order into free slots (``prefetch`` ahead of the one
computing: :meth:`BlockStreamer.pump`), orders the compute after each upload (:meth:`wait`) and, when
the last half leaves a block, offloads it (:meth:`release`: copied back into its host store, or dropped
when the precision strategy keeps the state on the host). A forward outside a step (evaluation) streams
the blocks the same way, with the same prefetch, from the flushed host stores
(:meth:`begin_observation`, :meth:`observe`, :meth:`end_observe`). Under AMP each upload reads a
staging slot (:mod:`zo2.staging`) that the host pass filled just before it: during a step ``prepare``
(the master update fused with the low-precision cast), outside one ``prepare`` on the flushed master
(the cast alone). With ``host_thread`` (CUDA machines) the host pass runs on a host thread, one
staging slot ahead of the uploads: the pass of block b + slots is queued when block b's upload is
issued, into the slot that upload reads, and waits for that upload to finish; inline otherwise. With
the host thread nothing but the compute waits for a pass: :meth:`pump` issues only the uploads whose
passes have finished, and a half entering block b (:meth:`enter`) waits for block b's pass alone. So
the step start returns at once, and the resident modules' forward (embeddings) and block 0's copy
overlap the passes of the blocks after it. The
copies themselves are :class:`~zo2.ring.Ring`'s: CUDA streams and events on a GPU, synchronous copies on the CPU, or the
asynchronous CPU copy streams of :mod:`zo2.copy_executor` (stream-ordering tests; the delay hook is
``streamer.ring.before_copy``).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from memtrain.kernels.zo_perturb import cpu_threads
from zo2.ring import BlockStore, Ring
from zo2.staging import StagingRing, staging_slots


def default_host_threads(device: torch.device) -> int | None:
    """CPU threads of AMP's host pass when ``zo2.offload(host_threads=None)``: on CUDA torch's intra-op thread
    count less one, the core of the thread that launches the compute and the copies while the pass runs
    beside it on the host thread (a pass on every core would delay those launches); on the CPU None
    (torch's count: the pass runs inline, between the computes, and has the cores to itself)."""
    return max(1, torch.get_num_threads() - 1) if device.type == "cuda" else None


def check_host_threads(host_threads: object) -> int | None:
    """``host_threads`` if it is None or an int >= 1; else ValueError naming the fix."""
    if host_threads is not None and (isinstance(host_threads, bool) or not isinstance(host_threads, int)
                                     or host_threads < 1):
        raise ValueError(f"zo2.offload: host_threads must be an int >= 1 (threads of AMP's host pass) or None (the "
                         f"default: torch.get_num_threads() - 1 on CUDA), got {host_threads!r}")
    return host_threads


class BlockStreamer:
    """The ring of ``prefetch + 1`` device slots and the blocks' trips through it.

    Args:
        device: where the slots live.
        stores: the blocks' host stores, in model order.
        prefetch: blocks uploaded ahead of the computing one.
        prepare: ``prepare(b, wire)``: the host pass that writes block b's low-precision copy into the
            views ``wire`` of a staging slot before each upload (AMP), or None (the master is uploaded).
        copy_back: copy a block's slot back into its host store when it leaves the device.
        host_thread: run ``prepare`` on a host thread ahead of the uploads during a step.
        host_threads: CPU threads of each host pass (:func:`memtrain.kernels.zo_perturb.cpu_threads`;
            None: torch's intra-op thread count). Settable between steps (``streamer.host_threads``).
        log: ``log(op, block, slot=...)`` for the engine's trace.
    """

    def __init__(self, device: torch.device, stores: list[BlockStore], prefetch: int,
                 prepare: Callable[[int], None] | None, copy_back: bool, host_thread: bool,
                 log: Callable[..., None], host_threads: int | None = None) -> None:
        self.stores = stores
        self.host_threads = host_threads
        self.prepare = prepare
        self.copy_back = copy_back
        self.log = log
        wire_bytes = max(s.wire_layout.nbytes for s in stores)
        self.ring = Ring(device, prefetch + 1, wire_bytes)
        self.staging = (StagingRing(staging_slots(prefetch), wire_bytes, pin=device.type == "cuda")
                        if prepare is not None else None)
        self._next_stage = 0  # the staging slot the next inline host pass writes
        self.free_slots: deque[int] = deque(range(self.ring.slots))
        self.resident_slot: dict[int, int] = {}  # block -> slot, while resident
        self.next_upload = 0
        self._offloaded: dict = {}  # the event ending the copy back into each block's host store (async copies)
        self.host_pool = ThreadPoolExecutor(1, thread_name_prefix="zo2-host") if (
            host_thread and prepare is not None) else None
        self._prepared: dict[int, tuple[Future, int]] = {}  # block -> its queued host pass, its staging slot
        self.observing: str | None = None  # "model" or "block" during a forward outside a step

    # ---------------------------------------------------------------------------------- the step
    def start_step(self) -> None:
        """Queue the first blocks' host passes (on the host thread, one per staging slot) and upload the
        first blocks: with the host thread only those whose passes have already finished (none waits
        here; the compute waits for its own block's pass in :meth:`enter`)."""
        self.end_observation()
        self.next_upload = 0
        if self.host_pool is not None:
            for b in range(min(self.staging.slots, len(self.stores))):
                self._queue_pass(b, (self._next_stage + b) % self.staging.slots)
        self.pump()

    def _queue_pass(self, b: int, stage: int) -> None:
        """Queue block b's host pass into staging slot ``stage`` on the host thread."""
        self._prepared[b] = (self.host_pool.submit(self._host_pass, b, stage), stage)

    def _host_pass(self, b: int, stage: int) -> None:
        """Block b's low-precision copy into staging slot ``stage``, once its last upload has finished."""
        flat = self.staging.acquire(stage)
        with cpu_threads(self.host_threads):
            self.prepare(b, self.stores[b].wire_layout.views(flat))

    def _source(self, b: int) -> tuple[torch.Tensor, int | None]:
        """The host buffer block b is uploaded from, and its staging slot (None: the master itself)."""
        store = self.stores[b]
        if self.staging is None:
            return store.wire_flat, None
        queued = self._prepared.pop(b, None)
        if queued is not None:  # prepared ahead on the host thread
            queued[0].result()
            stage = queued[1]
        else:  # inline: the next staging slot
            stage = self._next_stage
            self._host_pass(b, stage)
        self._next_stage = (stage + 1) % self.staging.slots
        return self.staging.buffers[stage][:store.wire_layout.nbytes], stage

    def pump(self, stop: int | None = None, need: int | None = None) -> None:
        """Upload the next blocks (up to ``stop``) into the free slots. Under AMP each block's host pass
        writes its staging slot first (``prepare``: during a step the fused update and cast, while
        observing the cast of the flushed master). A pass queued on the host thread is not waited for:
        pumping stops at the first block whose pass is still running, unless that block is ``need``."""
        stop = len(self.stores) if stop is None else min(stop, len(self.stores))
        while self.next_upload < stop and self.free_slots:
            b = self.next_upload
            queued = self._prepared.get(b)
            if queued is not None and b != need and not queued[0].done():
                break  # uploaded once its pass has finished (a later pump) or when a half needs it (enter)
            self.next_upload += 1
            slot = self.free_slots.popleft()
            store = self.stores[b]
            source, stage = self._source(b)
            done = self.ring.upload(slot, source, after=self._offloaded.pop(b, None))
            if stage is not None:
                self.staging.uploaded(stage, done)
                ahead = b + self.staging.slots
                if self.host_pool is not None and self.observing is None and ahead < len(self.stores):
                    self._queue_pass(ahead, stage)  # the slot this upload reads, once it has finished
            store.attach(store.wire_layout.views(self.ring.buffers[slot]))
            self.resident_slot[b] = slot
            self.log("upload", b, slot=slot)

    def enter(self, b: int) -> None:
        """A half enters block b during a step: issue the uploads whose host passes have finished, block
        b's own once its pass has (the only pass the compute waits for), and order the compute after
        block b's upload."""
        self.pump()
        if b not in self.resident_slot and b == self.next_upload:
            self.pump(stop=b + 1, need=b)
        self.wait(b)

    def wait(self, b: int) -> None:
        """Order the current (compute) stream after block b's upload."""
        slot = self.resident_slot.get(b)
        if slot is None:
            raise RuntimeError(f"zo2.offload: block {b} is not resident when a half enters it (ring of "
                               f"{self.ring.slots} slots); this is a scheduling bug")
        self.ring.wait_uploaded(slot)

    def release(self, b: int, copy_back: bool | None = None) -> None:
        """Offload block b after the compute issued so far, and give its slot to the next upload (copied
        back into its host store when ``copy_back``, default: the strategy's)."""
        slot = self.resident_slot.pop(b)
        store = self.stores[b]
        copy_back = self.copy_back if copy_back is None else copy_back
        done = self.ring.release(slot, store.master_flat if copy_back else None)
        if done is not None and copy_back:
            self._offloaded[b] = done
        store.attach(store.master)
        self.free_slots.append(slot)
        self.log("offload", b, slot=slot)

    def abort(self, released: Callable[[int], None]) -> None:
        """After a failed step: finish the host work, bring every resident block home (``released(b)``
        first), free every slot."""
        for future, _ in self._prepared.values():
            future.result()
        self._prepared.clear()
        for b in list(self.resident_slot):
            released(b)
            self.release(b)
        self.free_slots = deque(range(self.ring.slots))

    # ------------------------------------------------------------------------ outside a step
    def begin_observation(self) -> None:
        """A model forward outside a step (evaluation) starts: stream the blocks in order with the step's
        prefetch, from their clean host stores (flushed: nothing is copied back)."""
        self.end_observation()
        self.observing = "model"
        self.next_upload = 0
        self.pump()

    def observe(self, b: int) -> None:
        """Block b is entered outside a step: wait for its upload. A block that is not the next one in
        order (a repeat, a skip, or a block called outside a model forward) is uploaded on demand."""
        if b not in self.resident_slot:
            if self.observing is None:
                self.observing = "block"  # a block called on its own: bring it alone, drop it after
            self._drop_resident()
            self.next_upload = b
            self.pump(stop=b + 1 if self.observing == "block" else None)
        self.wait(b)

    def end_observe(self, b: int) -> None:
        """Block b's forward outside a step is done: free its slot for the next block."""
        if b in self.resident_slot:
            self.release(b, copy_back=False)
        if self.observing == "model":
            self.pump()
        else:
            self.end_observation()

    def end_observation(self) -> None:
        """The observing forward ended (or raised): drop what is still resident."""
        self._drop_resident()
        self.observing = None
        self.next_upload = 0

    def _drop_resident(self) -> None:
        for b in list(self.resident_slot):
            self.release(b, copy_back=False)

    def synchronize(self) -> None:
        """Wait for every copy in flight (before the host reads or writes the host stores)."""
        self.ring.synchronize()
        if self.staging is not None:
            self.staging.synchronize()
        self._offloaded.clear()

    def time_transfers(self, rounds: int = 1) -> float:
        """Seconds of one step's transfers alone: every block uploaded once and offloaded once (copied
        back when the state returns to the host), no compute; the median over ``rounds``. CUDA events
        time the copies on a GPU, ``time.perf_counter`` on the CPU. Leaves every host store as it was."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"time_transfers: rounds must be an int >= 1, got {rounds!r}")
        if self.resident_slot:
            raise RuntimeError("time_transfers: blocks are resident (a step is running); call it between steps")
        self.synchronize()
        times = []
        for _ in range(rounds):
            if self.ring.cuda:
                device = self.ring.device
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(torch.cuda.current_stream(device))
                last = self._transfer_all(after=start)
                torch.cuda.current_stream(device).wait_event(last)
                end.record(torch.cuda.current_stream(device))
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                self._transfer_all(after=None)
                self.ring.synchronize()
                times.append(time.perf_counter() - t0)
        self.synchronize()
        return statistics.median(times)

    def _transfer_all(self, after: torch.cuda.Event | None) -> torch.cuda.Event | None:
        """Every block up into slot b % slots and out again; returns the last offload's CUDA event."""
        done = None
        for b, store in enumerate(self.stores):
            slot = b % self.ring.slots
            if self.staging is None:
                source = store.wire_flat
            else:  # the bytes of a staged block (its contents do not matter here)
                stage = b % self.staging.slots
                source = self.staging.acquire(stage)[:store.wire_layout.nbytes]
            up = self.ring.upload(slot, source, after=after if b == 0 else None)
            if self.staging is not None:
                self.staging.uploaded(stage, up)
            self.ring.wait_uploaded(slot)
            done = self.ring.release(slot, store.master_flat if self.copy_back else None)
        return done

    def host_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Every host buffer of the stores and staging slots, with its role ("master" or "staging")."""
        out = [("master", store.master_flat) for store in self.stores]
        return out + [("staging", flat) for flat in (self.staging.buffers if self.staging is not None else [])]

    def close(self) -> None:
        """Stop the host thread and the copy workers, and free the staging slots (after their uploads)."""
        if self.host_pool is not None:
            self.host_pool.shutdown()
        if self.staging is not None:
            self.staging.synchronize()
            self.staging = None
        executor = self.ring.executor
        if executor is not None:
            self.ring.set_executor(None)
            executor.close()
