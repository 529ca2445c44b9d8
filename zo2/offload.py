"""zo2.offload: stream a model's transformer blocks through the device during zeroth-order steps.

After ``zo2.offload(model, opt)`` the training loop is unchanged: ``loss = opt.step(closure)``. One step:

- the blocks are uploaded one after another into a ring of device buffers, ``prefetch`` blocks ahead
  of the one computing;
- the closure runs once per half (θ+εz_k and θ-εz_k, 2q halves), each on its own worker thread, in
  lock-step: every half passes through block i while it is resident (see :mod:`zo2.halves`);
- before the first half uses a block, one fused pass applies the previous step's restore and update
  and this step's +εz; between halves one pass flips it; after the last half the block is offloaded
  (left at θ-εz, its update deferred to the next step's pass, see :mod:`zo2.deferred`);
- the resident modules (embeddings, final norm, head) stay on the device and take the same passes
  when a half enters them.

So each block crosses the bus once per direction per step, and its parameters are read and written
twice per step. Anything that observes the model (a forward pass outside ``opt.step``,
``model.state_dict()``, ``opt.state_dict()``, ``opt.flush()``, ``engine.detach()``) first flushes: the
pending restore and update are applied and every parameter holds its trained value.

AMP (``amp="bf16"`` or ``"fp16"``): the host keeps an fp32 master of every block, the bus and the
compute carry a low-precision copy, and the update lands on the master on the host with the same z (the
C++ kernel), so updates far below a bf16 ulp accumulate. The low-precision device copy is discarded
after the step instead of being copied back, which halves the traffic.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from zo2.blocks import check_block_ownership, find_blocks, resident_modules, tensors_bytes
from zo2.checks import dropout_error, loss_value, record_active_dropout
from zo2.deferred import NoiseState, StepRecord, Target, move
from zo2.halves import HalfAborted, HalfScheduler, HalfWorkers, thread_state_context
from zo2.optimizer import ZOSGD
from zo2.plan import OffloadPlan, check_fits
from zo2.ring import BlockStore, Ring, wire_layout

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TraceEvent:
    """One scheduled operation: ``op`` in prepare (AMP master update), upload, perturb, compute, offload,
    flush; ``half`` for perturb/compute; ``slot`` for upload/offload."""

    op: str
    block: int
    step: int
    half: int | None = None
    slot: int | None = None


@dataclass
class _ResidentParam:
    param: nn.Parameter
    stream: int
    group: int
    master: torch.Tensor | None = None  # AMP: the fp32 master on the device
    lowp: torch.Tensor | None = None  # AMP: the low-precision compute copy (allocated once)
    state: NoiseState | None = None  # of the compute tensor (== master without AMP)
    master_state: NoiseState | None = None  # AMP only


class OffloadEngine:
    """The streaming engine behind :func:`offload`. Use :func:`offload` to build one."""

    def __init__(self, model: nn.Module, opt: ZOSGD, device: torch.device, amp: str | None,
                 blocks: str | list[nn.Module] | None, prefetch: int, trace: bool, verbose: bool) -> None:
        self.model = model
        self.opt = opt
        self.device = device
        self.amp = amp
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.prefetch = prefetch
        self.tracing = trace
        self.trace: list[TraceEvent] = []
        self.block_path, self.blocks = find_blocks(model, blocks)
        check_block_ownership(model, self.blocks)
        self._index_params()
        self.plan = self._make_plan()
        check_fits(self.plan, device, self._extra_host_bytes())
        if verbose:
            print(self.plan)
        self._hooks: list = []
        self.stores: list[BlockStore] = []
        self.block_state: list[NoiseState] = []  # per block: host store / device copy (no AMP), master (AMP)
        self.device_state: dict[int, NoiseState] = {}  # AMP: state of each resident block's device copy
        self.resident_slot: dict[int, int] = {}
        self._offloaded: dict[int, torch.cuda.Event] = {}  # CUDA: the copy back of each block's host store
        self.free_slots: deque[int] = deque()
        self.next_upload = 0
        self.record: StepRecord | None = None
        self.scheduler: HalfScheduler | None = None
        self.dirty = False
        self.workers = HalfWorkers()
        # AMP on CUDA: the host-side master update and low-precision cast of the next blocks run on a
        # host thread while the GPU computes (the C++ kernel releases the GIL); on CPU they run inline.
        self._host_pool = ThreadPoolExecutor(1, thread_name_prefix="zo2-host") if (
            amp and device.type == "cuda") else None
        self._prepared: dict[int, Future] = {}
        self._build()

    # ------------------------------------------------------------------------------------ set-up
    def _index_params(self) -> None:
        group_of = {id(g): i for i, g in enumerate(self.opt.param_groups)}
        model_params = {id(p) for p in self.model.parameters()}
        self.stream_of: dict[int, tuple[int, int]] = {}
        for stream, (p, group) in enumerate(self.opt._unique_params()):
            if id(p) not in model_params:
                raise ValueError(f"zo2.offload: the optimizer's parameter {stream} (shape {tuple(p.shape)}) is not a "
                                 "parameter of the model; build the optimizer from model.parameters()")
            if p.requires_grad:
                self.stream_of[id(p)] = (stream, group_of[id(group)])
        block_param_ids = {id(p) for b in self.blocks for p in b.parameters()}
        self.resident_owners: list[tuple[nn.Module, list[nn.Parameter]]] = []
        for _, module in resident_modules(self.model, self.blocks):
            own = [p for p in module.parameters(recurse=False) if id(p) in self.stream_of]
            if own:
                self.resident_owners.append((module, own))
        self.resident_params: dict[int, _ResidentParam] = {}
        for _, own in self.resident_owners:
            for p in own:
                stream, group = self.stream_of[id(p)]
                self.resident_params.setdefault(id(p), _ResidentParam(p, stream, group))
        self._block_param_ids = block_param_ids

    def _make_plan(self) -> OffloadPlan:
        wire_size = self.amp_dtype.itemsize if self.amp_dtype else None
        block_bytes = [wire_layout(list(block.parameters()), self.amp_dtype).nbytes for block in self.blocks]
        residents = [p for p in self.model.parameters() if id(p) not in self._block_param_ids]
        resident = sum(p.numel() * (wire_size or p.element_size()) for p in residents)
        if self.amp_dtype is not None:  # fp32 masters of the trainable resident parameters
            resident += sum(r.param.numel() * 4 for r in self.resident_params.values())
        resident += tensors_bytes(list(self.model.buffers()))
        # the host store: each block's master, and under AMP its low-precision wire copy beside it
        host = sum(wire_layout(list(b.parameters()), None).nbytes for b in self.blocks)
        if self.amp_dtype is not None:
            host += sum(block_bytes)
        config = getattr(self.model, "config", None)
        slots = self.prefetch + 1
        return OffloadPlan(
            device=str(self.device), amp=self.amp, num_blocks=len(self.blocks), block_bytes=max(block_bytes),
            ring_slots=slots, ring_bytes=slots * max(block_bytes), resident_bytes=resident, host_bytes=host,
            num_halves=2 * self.opt.num_perturbations, hidden_size=getattr(config, "hidden_size", None),
            vocab_size=getattr(config, "vocab_size", None), compute_itemsize=wire_size or 4)

    def _extra_host_bytes(self) -> int:
        # The host store replaces the parameters' storage block by block; AMP adds the low-precision copy.
        return self.plan.host_bytes - sum(p.numel() * p.element_size() for b in self.blocks for p in b.parameters())

    def _build(self) -> None:
        pin = self.device.type == "cuda"
        with torch.no_grad():
            for block in self.blocks:
                self.stores.append(BlockStore(block, self.amp_dtype, pin))
                self.block_state.append(NoiseState())
                for buf_owner in block.modules():
                    for name, buf in buf_owner.named_buffers(recurse=False):
                        buf_owner._buffers[name] = buf.to(self.device)
            for _, module in resident_modules(self.model, self.blocks):
                for p in module.parameters(recurse=False):
                    if id(p) in self._block_param_ids or p.device == self.device:
                        continue
                    p.data = p.data.to(self.device)
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)
            if self.amp_dtype is not None:
                self._resident_frozen_lowp: dict[int, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
                for p in self.model.parameters():
                    if id(p) in self._block_param_ids or not p.is_floating_point():
                        continue
                    if id(p) in self.resident_params:
                        r = self.resident_params[id(p)]
                        r.master = p.data
                        r.lowp = torch.empty_like(p.data, dtype=self.amp_dtype)
                        r.master_state = NoiseState()
                    elif id(p) not in self._resident_frozen_lowp:
                        # frozen: the device needs only the low-precision copy; the fp32 original waits on
                        # the host for observers and detach()
                        lowp = p.data.to(self.amp_dtype)
                        self._resident_frozen_lowp[id(p)] = (p, p.data.cpu(), lowp)
            for r in self.resident_params.values():
                r.state = NoiseState()
        slot_bytes = max(s.wire_layout.nbytes for s in self.stores)
        self.ring = Ring(self.device, self.prefetch + 1, slot_bytes)
        self.free_slots.extend(range(self.ring.slots))
        for b, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, b=b: self._before_block(b)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, b=b: self._after_block(b)))
        for module, own in self.resident_owners:
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, own=own: self._before_resident(own)))
        self._takes_use_cache = "use_cache" in inspect.signature(self.model.forward).parameters
        self._hooks.append(self.model.register_forward_pre_hook(lambda m, a, kw: self._before_model(a, kw),
                                                                with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(lambda m, a, o: self._after_model()))
        for module in self.model.modules():
            self._hooks.append(module.register_state_dict_pre_hook(lambda *a: self.flush()))
            self._hooks.append(module.register_load_state_dict_pre_hook(lambda *a: self.flush()))

    def _log(self, op: str, block: int, half: int | None = None, slot: int | None = None) -> None:
        if self.tracing:
            step = self.record.step if self.record is not None else self.opt.step_count
            self.trace.append(TraceEvent(op, block, step, half, slot))

    # ---------------------------------------------------------------------------------- the step
    @property
    def in_step(self) -> bool:
        return self.scheduler is not None

    def _half_target(self, half: int) -> dict[int, float]:
        assert self.record is not None
        return {self.record.seeds[half // 2]: 1.0 if half % 2 == 0 else -1.0}

    def step(self, closure) -> torch.Tensor:
        """One offloaded zeroth-order step, called by :meth:`zo2.ZOSGD.step` (which checks the closure and
        the hyperparameters); same contract."""
        opt = self.opt
        if self.in_step:
            raise RuntimeError("zo2.offload: opt.step was called from inside a closure of the running step")
        seeds = opt.seeds_for_step(opt.step_count)
        self.record = StepRecord(opt.step_count, seeds,
                                 [(g["lr"], g["eps"], g["weight_decay"]) for g in opt.param_groups])
        num_halves = 2 * len(seeds)
        self.scheduler = HalfScheduler(num_halves, len(self.blocks))
        self.dirty = True
        found: list[str] = []
        try:
            self._begin_step()
            make_ctx = thread_state_context()
            scheduler = self.scheduler

            def job(half: int):
                with make_ctx():
                    return scheduler.run_half(half, closure)

            with record_active_dropout(found) if opt.check_dropout else nullcontext():
                results = self.workers.run([lambda h=h: job(h) for h in range(num_halves)], scheduler.abort)
            errors = [v for ok, v in results if not ok and not isinstance(v, HalfAborted)]
            if errors:
                raise errors[0]
            if found:
                raise dropout_error(found)
            losses = [loss_value(v) for _, v in results]
            if len(self.resident_slot) != 0:
                raise RuntimeError(f"zo2.offload: blocks {sorted(self.resident_slot)} still resident after the step")
        except BaseException:
            self._abort_step()
            raise
        finally:
            self.scheduler = None
        return self._finish_step(losses)

    def _finish_step(self, losses: list[float]) -> torch.Tensor:
        """Record the step's losses; its update (or, for a non-finite loss, its restore) is deferred."""
        opt, record = self.opt, self.record
        assert record is not None
        losses = opt.reduce_losses(losses)
        plus, minus = losses[0::2], losses[1::2]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            record.skipped = True  # the parameters are restored by the next pass over each tensor
            return opt._skip(lambda: None, "L+" if bad % 2 == 0 else "L-", losses[bad], plus)
        record.diffs = [(p - m) / 2.0 for p, m in zip(plus, minus, strict=True)]
        return opt._record_step(record.diffs, plus)

    def _begin_step(self) -> None:
        if self.amp_dtype is not None:
            for r in self.resident_params.values():
                self._move([Target(r.master, r.stream, r.group)], r.master_state, None, {})
                r.master_state = NoiseState(self.record, {})  # this step's update is due on the master
            self._use_low_precision_residents()
        self.next_upload = 0
        if self._host_pool is not None:
            self._prepared = {b: self._host_pool.submit(self._prepare_master, b) for b in range(len(self.blocks))}
        self._pump_uploads()

    def _move(self, targets: list[Target], state: NoiseState, record: StepRecord | None,
              target: dict[int, float]) -> NoiseState:
        return move(targets, state, record, target, self.opt.distribution)

    def _block_targets(self, b: int, master: bool = False) -> list[Target]:
        """Block b's trainable tensors: where its parameters point now, or its host master."""
        store = self.stores[b]
        tensors = store.master if master else [p.data for p in store.params]
        return [Target(t, *self.stream_of[id(p)]) for p, t in zip(store.params, tensors, strict=True)
                if id(p) in self.stream_of]

    def _pump_uploads(self) -> None:
        while self.next_upload < len(self.blocks) and self.free_slots:
            b = self.next_upload
            self.next_upload += 1
            slot = self.free_slots.popleft()
            store = self.stores[b]
            if self.amp_dtype is not None:
                future = self._prepared.pop(b, None)
                if future is not None:
                    future.result()
                else:
                    self._prepare_master(b)
            self.ring.upload(slot, store.wire_flat, after=self._offloaded.pop(b, None))
            store.attach(store.wire_layout.views(self.ring.buffers[slot]))
            if self.amp_dtype is not None:
                self.device_state[b] = NoiseState()
            self.resident_slot[b] = slot
            self._log("upload", b, slot=slot)

    def _prepare_master(self, b: int) -> None:
        """AMP: apply block b's pending update to its host master and fill its low-precision wire copy."""
        if not self.block_state[b].clean:
            self.block_state[b] = self._move(self._block_targets(b, master=True), self.block_state[b], None, {})
            self._log("prepare", b)
        self.stores[b].fill_wire()

    def _current_half(self) -> int | None:
        """The half this thread runs in the current step, or None outside one (the model is observed)."""
        return None if self.scheduler is None else self.scheduler.current_half

    def _before_block(self, b: int) -> None:
        half = self._current_half()
        if half is None:
            self._observe_block(b)
            return
        self.scheduler.enter_block(b)
        slot = self.resident_slot.get(b)
        if slot is None:
            raise RuntimeError(f"zo2.offload: block {b} is not resident when half {half} enters it (ring of "
                               f"{self.ring.slots} slots); this is a scheduling bug")
        self.ring.wait_uploaded(slot)
        # The device copy is the block's state without AMP; under AMP it is a copy of the clean master.
        states = self.block_state if self.amp_dtype is None else self.device_state
        states[b] = self._move(self._block_targets(b), states[b], self.record, self._half_target(half))
        self._log("perturb", b, half=half)
        self._log("compute", b, half=half)

    def _after_block(self, b: int) -> None:
        half = self._current_half()
        if half is None:
            self._end_observe_block(b)
            return
        if half == self.scheduler.num_halves - 1:
            self._release(b)
            self._pump_uploads()

    def _release(self, b: int) -> None:
        slot = self.resident_slot.pop(b)
        store = self.stores[b]
        if self.amp_dtype is None:
            done = self.ring.release(slot, store.master_flat)
            if done is not None:
                self._offloaded[b] = done
        else:
            self.ring.release(slot, None)
            self.device_state.pop(b, None)
            if self.record is not None and not self.record.skipped:
                self.block_state[b] = NoiseState(self.record, {})
        store.attach(store.master)
        self.free_slots.append(slot)
        self._log("offload", b, slot=slot)

    def _before_resident(self, own: list[nn.Parameter]) -> None:
        half = self._current_half()
        if half is None:
            self.flush()
            return
        target = self._half_target(half)
        for p in own:
            r = self.resident_params[id(p)]
            r.state = self._move([Target(r.param.data, r.stream, r.group)], r.state, self.record, target)

    def _abort_step(self) -> None:
        """After a failed step: bring every block home, drop this step's perturbation, flush."""
        if self.record is not None and not self.record.finished:
            self.record.skipped = True
        self.scheduler = None
        for future in self._prepared.values():
            future.result()
        self._prepared.clear()
        for b in list(self.resident_slot):
            self._release(b)
        self.free_slots = deque(range(self.ring.slots))
        self.flush()

    # ----------------------------------------------------------------------------- observation
    def _before_model(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._current_half() is not None:
            if self._takes_use_cache and kwargs.get("use_cache") is not False:
                # A KV cache would keep every block's keys and values on the device for each half.
                return args, {**kwargs, "use_cache": False}
            return None
        self.flush()
        if self.amp_dtype is not None:
            self._use_low_precision_residents()
        return None

    def _after_model(self) -> None:
        if self._current_half() is None:
            self._restore_masters()

    def _use_low_precision_residents(self) -> None:
        """AMP: point the resident parameters at their low-precision copies (trainable ones refreshed from
        their clean fp32 masters) for a step or an observing forward; ``_restore_masters`` undoes it."""
        for r in self.resident_params.values():
            r.lowp.copy_(r.master)
            r.param.data = r.lowp
            r.state = NoiseState()
        for p, _, lowp in self._resident_frozen_lowp.values():
            p.data = lowp

    def _restore_masters(self) -> None:
        if self.amp_dtype is not None:
            for r in self.resident_params.values():
                r.param.data = r.master
            for p, full, _ in self._resident_frozen_lowp.values():
                p.data = full

    def _observe_block(self, b: int) -> None:
        """A forward outside a step (evaluation): stream the flushed block through slot 0, synchronously."""
        self.flush()
        store = self.stores[b]
        store.fill_wire()
        self.ring.upload(0, store.wire_flat)
        self.ring.wait_uploaded(0)
        store.attach(store.wire_layout.views(self.ring.buffers[0]))

    def _end_observe_block(self, b: int) -> None:
        self.ring.release(0, None)
        self.stores[b].attach(self.stores[b].master)

    def flush(self) -> None:
        """Apply the pending restore and update: every parameter holds its trained value afterwards."""
        if not self.dirty:
            return
        if self.in_step:
            raise RuntimeError("zo2.offload: the model was observed (state_dict, flush or a forward outside the "
                               "closure's model call) while a step is running; do that between steps")
        self.ring.synchronize()
        self._offloaded.clear()
        for b in range(len(self.blocks)):
            self.block_state[b] = self._move(self._block_targets(b, master=True), self.block_state[b], None, {})
        for r in self.resident_params.values():
            if self.amp_dtype is None:
                r.state = self._move([Target(r.param.data, r.stream, r.group)], r.state, None, {})
            else:
                r.master_state = self._move([Target(r.master, r.stream, r.group)], r.master_state, None, {})
                r.state = NoiseState()
        self._restore_masters()
        self.dirty = False
        self._log("flush", -1)

    def detach(self) -> nn.Module:
        """Flush, remove the hooks and bring every parameter back to the host as a plain module."""
        self.flush()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.device.type != "cpu":
                    p.data = p.data.cpu()
            for module in self.model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.cpu()
        self.workers.close()
        if self._host_pool is not None:
            self._host_pool.shutdown()
        self.opt.offload_engine = None
        return self.model


def offload(model: nn.Module, opt: ZOSGD, device: str | torch.device = "cuda", amp: str | None = None, *,
            blocks: str | list[nn.Module] | None = None, prefetch: int = 1, trace: bool = False,
            verbose: bool = True) -> OffloadEngine:
    """Stream ``model``'s transformer blocks through ``device`` during ``opt.step(closure)``.

    Args:
        model: a model on the CPU (e.g. a Hugging Face causal LM) in eval mode (dropout off).
        opt: the :class:`zo2.ZOSGD` built from ``model.parameters()``.
        device: where the compute runs; "cpu" runs the same engine and schedule without a GPU.
        amp: None (the parameters' dtype), "bf16" or "fp16" (fp32 master on the host, low-precision
            copy on the bus and in the compute).
        blocks: the block list (dotted path, ModuleList or list of modules); found automatically for
            OPT, Llama, Mistral, Qwen2, GPT-2, GPT-NeoX and MPT layouts.
        prefetch: blocks uploaded ahead of the computing one (the ring has prefetch + 1 slots).
        trace: record the schedule in ``engine.trace`` (a list of :class:`TraceEvent`).
        verbose: print the memory plan.

    The closure must call the model exactly once (it runs once per half, 2q times per step). Returns
    the engine; ``engine.detach()`` turns the model back into a plain host model.
    """
    if not isinstance(opt, ZOSGD):
        raise TypeError(f"zo2.offload needs a zo2.ZOSGD optimizer, got {type(opt).__name__}")
    if getattr(opt, "offload_engine", None) is not None:
        raise RuntimeError("zo2.offload: this optimizer is already attached to an offload engine; call "
                           "engine.detach() first")
    if not isinstance(model, nn.Module):
        raise TypeError(f"zo2.offload needs an nn.Module, got {type(model).__name__}")
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"zo2.offload: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"zo2.offload: prefetch must be an int >= 0, got {prefetch!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("zo2.offload: device='cuda' but CUDA is not available here; use device='cpu' to run "
                               "the same engine on the CPU, or plain ZOSGD")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"zo2.offload: device must be 'cpu' or 'cuda', got {device!r}")
    on_device = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
    if on_device:
        raise ValueError(f"zo2.offload: parameters are already on {model.get_parameter(on_device[0]).device} "
                         f"({on_device[0]}, ...); load the model on the CPU: the engine moves the resident modules "
                         "itself and streams the blocks")
    if amp is not None:
        not_fp32 = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
        if not_fp32:
            raise TypeError(f"zo2.offload: amp={amp!r} keeps an fp32 master, but {not_fp32[0]} is "
                            f"{model.get_parameter(not_fp32[0]).dtype}; load the model in float32 "
                            "(torch_dtype=torch.float32)")
    engine = OffloadEngine(model, opt, dev, amp, blocks, prefetch, trace, verbose)
    opt.offload_engine = engine
    return engine
