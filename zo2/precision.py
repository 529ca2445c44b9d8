"""Where an offloaded model's trainable state lives, and in which precision.

Two strategies, chosen by ``zo2.offload(..., amp=)``:

- :class:`NativePrecision` (``amp=None``): a block's host store holds its parameters in their own dtype;
  the device copy is uploaded from it, perturbed there and copied back after the last half (left at
  θ-εz, its update deferred to the next step's first pass). One :class:`NoiseState` per block describes
  both copies. Resident parameters are perturbed in place on the device, moved to a half's state each time
  that half takes the baton.
- :class:`HostMasterPrecision` (``amp="bf16"/"fp16"``): the host store holds an fp32 master; its
  low-precision copy is written into a staging slot just before each upload (:meth:`prepare`, fused with
  the update that lands on the master, so updates far below a bf16 ulp accumulate); the device copy is
  perturbed and discarded after the last half. Trainable resident parameters keep an fp32 master on the
  device and a low-precision compute copy; frozen ones only the low-precision copy (their fp32 original
  waits on the host for observers).

The engine calls the same methods on either; every pass is a transition of :mod:`zo2.transitions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memtrain.kernels.zo_perturb import cast_into
from zo2.ring import BlockStore
from zo2.transitions import NoiseState, StepRecord, Target, move

Log = Callable[..., None]


@dataclass
class ResidentParam:
    """A trainable parameter that stays on the device: its stream id, param group and noise state(s)."""

    param: nn.Parameter
    stream: int
    group: int
    state: NoiseState  # of the tensor the compute uses (param.data)
    master: torch.Tensor | None = None  # AMP: the fp32 master on the device
    lowp: torch.Tensor | None = None  # AMP: the low-precision compute copy (allocated once)
    master_state: NoiseState | None = None  # AMP only
    lowp_key: tuple[int, int] | None = None  # AMP: versions of (master, lowp) at the last cast

    def target(self, tensor: torch.Tensor) -> list[Target]:
        return [Target(tensor, self.stream, self.group)]


class NativePrecision:
    """Blocks and resident parameters computed in their own dtype (see the module docstring)."""

    copies_back = True  # the device copy returns to the host store after the last half
    amp_dtype: torch.dtype | None = None

    def __init__(self, index: dict[int, tuple[int, int]], pin: bool, log: Log) -> None:
        self.index = index  # id(param) -> (stream, group) of the trainable parameters
        self.pin = pin
        self.log = log
        self.stores: list[BlockStore] = []
        self.block_state: list[NoiseState] = []  # of the host store (and of the device copy, natively)
        self.residents: dict[int, ResidentParam] = {}

    # ------------------------------------------------------------------------------------ blocks
    def add_block(self, block: nn.Module) -> BlockStore:
        """Move ``block``'s parameters into a flat host store (freeing their storage) and track its state."""
        store = BlockStore(block, self.amp_dtype, self.pin)
        self.stores.append(store)
        self.block_state.append(NoiseState())
        return store

    def block_targets(self, b: int, master: bool = False) -> list[Target]:
        """Block b's trainable tensors: where its parameters point now, or its host master."""
        store = self.stores[b]
        tensors = store.master if master else [p.data for p in store.params]
        return [Target(t, *self.index[id(p)]) for p, t in zip(store.params, tensors, strict=True)
                if id(p) in self.index]

    def prepare(self, b: int, wire: list[torch.Tensor]) -> None:
        """Host-side work before block b's upload: nothing here (the master is uploaded and the device copy
        carries the state)."""

    def enter_block(self, b: int, record: StepRecord, target: dict[int, float]) -> None:
        """The pass that takes resident block b to a half's state (fused with the deferred update)."""
        self.block_state[b] = move(self.block_targets(b), self.block_state[b], record, target)

    def released(self, b: int, record: StepRecord | None) -> None:
        """Block b left the device after the last half of ``record``'s step."""

    def flush_block(self, b: int) -> None:
        """Bring block b's host store to clean θ."""
        self.block_state[b] = move(self.block_targets(b, master=True), self.block_state[b], None, {})

    def release_stores(self) -> None:
        """Give every block parameter its own copy of its host-store value and free the stores, one block
        at a time (after a flush; the engine is detached)."""
        for store in self.stores:
            store.release()

    # --------------------------------------------------------------------------------- residents
    def add_resident(self, p: nn.Parameter) -> None:
        """Track trainable resident parameter ``p`` (already on the device)."""
        if id(p) not in self.residents:
            self.residents[id(p)] = ResidentParam(p, *self.index[id(p)], NoiseState())

    def add_frozen_resident(self, p: nn.Parameter) -> None:
        """A resident parameter the optimizer does not update (already on the device)."""

    def begin_step(self, record: StepRecord) -> None:
        """Before the first half of ``record``'s step."""

    def enter_residents(self, record: StepRecord, target: dict[int, float]) -> None:
        """The pass that takes every trainable resident parameter to a half's state (when a half takes
        the baton: a resident tensor may be read anywhere in the forward, or not at all)."""
        for r in self.residents.values():
            r.state = move(r.target(r.param.data), r.state, record, target)

    def flush_residents(self) -> None:
        for r in self.residents.values():
            r.state = move(r.target(r.param.data), r.state, None, {})

    def use_compute_copies(self) -> None:
        """Point resident parameters at what the compute uses (a step, or a forward that observes)."""

    def use_masters(self) -> None:
        """Point resident parameters at what observers see (after a forward outside a step, a flush)."""


class HostMasterPrecision(NativePrecision):
    """fp32 masters (host for blocks, device for residents) and low-precision compute copies."""

    copies_back = False  # the low-precision device copy is discarded; the update lands on the master

    def __init__(self, index: dict[int, tuple[int, int]], pin: bool, log: Log, amp_dtype: torch.dtype) -> None:
        super().__init__(index, pin, log)
        self.amp_dtype = amp_dtype
        self.device_state: dict[int, NoiseState] = {}  # of each resident block's device copy
        self.frozen: dict[int, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}  # param, fp32 on host, lowp
        self.resident_casts = 0  # low-precision casts of trainable resident masters made so far

    def prepare(self, b: int, wire: list[torch.Tensor]) -> None:
        """Block b's host pass before an upload: apply its pending update to the host master and write its
        low-precision copy into ``wire`` (views of a staging slot) in the same pass; tensors without a
        pending update are cast alone. Runs on a host thread ahead of the uploads on CUDA machines (the C++
        kernel releases the GIL)."""
        store = self.stores[b]
        fused: set[int] = set()
        if not self.block_state[b].clean:
            wire_of = {id(m): w for m, w in zip(store.master, wire, strict=True)}
            targets = [dataclasses.replace(t, cast=wire_of[id(t.tensor)])
                       for t in self.block_targets(b, master=True)]
            self.block_state[b] = move(targets, self.block_state[b], None, {})
            fused = {id(t.tensor) for t in targets}
            self.log("prepare", b)
        for m, w in zip(store.master, wire, strict=True):
            if id(m) not in fused:
                if w.is_floating_point():
                    cast_into(w, m)  # on the pass's threads (memtrain.kernels.zo_perturb.cpu_threads)
                else:
                    w.copy_(m)
        store.casts += 1

    def enter_block(self, b: int, record: StepRecord, target: dict[int, float]) -> None:
        # a freshly uploaded device copy is the clean master in low precision
        state = self.device_state.get(b, NoiseState())
        self.device_state[b] = move(self.block_targets(b), state, record, target)

    def released(self, b: int, record: StepRecord | None) -> None:
        self.device_state.pop(b, None)
        if record is not None and not record.skipped:
            self.block_state[b] = NoiseState(record, {})  # the master owes this step's update

    def add_resident(self, p: nn.Parameter) -> None:
        if id(p) not in self.residents:
            super().add_resident(p)
            r = self.residents[id(p)]
            r.master, r.lowp, r.master_state = p.data, torch.empty_like(p.data, dtype=self.amp_dtype), NoiseState()

    def add_frozen_resident(self, p: nn.Parameter) -> None:
        if p.is_floating_point() and id(p) not in self.frozen:
            # the device needs only the low-precision copy; the fp32 original waits on the host
            self.frozen[id(p)] = (p, p.data.cpu(), p.data.to(self.amp_dtype))

    def begin_step(self, record: StepRecord) -> None:
        for r in self.residents.values():
            r.master_state = move(r.target(r.master), r.master_state, None, {})
            r.master_state = NoiseState(record, {})  # this step's update is due on the master
            r.lowp_key = None  # the kernels write through pointers: no version bump to rely on
        self.use_compute_copies()

    def enter_residents(self, record: StepRecord, target: dict[int, float]) -> None:
        """Each turn's low-precision copy is cast afresh from the clean fp32 master and perturbed once:
        flipping the copy in place on every turn would round it H·(blocks + 1) times a step."""
        for r in self.residents.values():
            r.lowp.copy_(r.master)
            self.resident_casts += 1
            r.state = move(r.target(r.lowp), NoiseState(), record, target)

    def flush_residents(self) -> None:
        for r in self.residents.values():
            r.master_state = move(r.target(r.master), r.master_state, None, {})
            r.state = NoiseState()
            r.lowp_key = None  # the step perturbed the low-precision copy in place

    def use_compute_copies(self) -> None:
        """Trainable residents: a low-precision copy of the clean fp32 master (cast again only when the
        master or the copy changed since the last cast); frozen: their copy."""
        for r in self.residents.values():
            key = (r.master._version, r.lowp._version)
            if r.lowp_key != key:
                r.lowp.copy_(r.master)
                self.resident_casts += 1
                r.lowp_key = (r.master._version, r.lowp._version)
            r.param.data = r.lowp
            r.state = NoiseState()
        for p, _, lowp in self.frozen.values():
            p.data = lowp

    def use_masters(self) -> None:
        for r in self.residents.values():
            r.param.data = r.master
        for p, full, _ in self.frozen.values():
            p.data = full


def make_precision(amp_dtype: torch.dtype | None, index: dict[int, tuple[int, int]], pin: bool,
                   log: Log) -> NativePrecision:
    """The strategy for ``amp_dtype`` (None: the parameters' own dtype)."""
    if amp_dtype is None:
        return NativePrecision(index, pin, log)
    return HostMasterPrecision(index, pin, log, amp_dtype)
