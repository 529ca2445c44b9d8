"""The offload engine: the model's hooks, the lock-step halves, and the step it runs for ZOSGD.

Built by :func:`zo2.offload` (see :mod:`zo2.offload` for what a step does). The engine holds three
parts: the memory plan (:func:`zo2.plan.plan_offload`), the precision strategy that owns where each
block's and resident parameter's state lives (:mod:`zo2.precision`), and the block streamer that owns
the ring, its slots and the copies (:mod:`zo2.streamer`). It implements
:class:`zo2.optimizer.StepEngine`: ZOSGD makes the step's record, the engine runs its halves, ZOSGD
finishes the step from their losses, and the engine applies the update on each tensor's next pass.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from zo2.blocks import find_blocks, resident_modules
from zo2.checks import dropout_error, record_active_dropout
from zo2.halves import HalfAborted, HalfScheduler, HalfWorkers, ThreadState
from zo2.loading import checkpoint_source, named_params
from zo2.optimizer import ZOSGD, Closure
from zo2.plan import AMP_DTYPES, check_fits, plan_offload
from zo2.precision import make_precision
from zo2.streamer import BlockStreamer, default_host_threads
from zo2.transitions import StepRecord


@dataclass(frozen=True)
class TraceEvent:
    """One scheduled operation: ``op`` in prepare (AMP master update), upload, perturb, compute, offload,
    flush; ``half`` for perturb/compute; ``slot`` for upload/offload."""

    op: str
    block: int
    step: int
    half: int | None = None
    slot: int | None = None


def _weak_method(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` called through a weak reference to its object (a no-op once the object is gone), so
    that the parts an engine owns do not keep it alive in a reference cycle."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return call


class OffloadEngine:
    """The streaming engine behind :func:`offload` (use :func:`offload` to build one): the model's hooks,
    the lock-step halves and the step. Where state lives is the precision strategy's
    (:mod:`zo2.precision`), the ring and the copies are the block streamer's (:mod:`zo2.streamer`), and
    the memory plan is :func:`zo2.plan.plan_offload`'s."""

    def __init__(self, model: nn.Module, opt: ZOSGD, device: torch.device, amp: str | None,
                 blocks: str | list[nn.Module] | None, prefetch: int, trace: bool, verbose: bool,
                 host_threads: int | None = None) -> None:
        self.model = model
        self.opt = opt
        self.device = device
        self.amp = amp
        self.tracing = trace
        self.trace: list[TraceEvent] = []
        self.block_path, self.blocks = find_blocks(model, blocks)
        index = self._index_params()
        self.plan = plan_offload(model, amp=amp, prefetch=prefetch, num_perturbations=opt.num_perturbations,
                                 blocks=self.blocks, device=device,
                                 trainable=[p for p, _ in opt.unique_params() if id(p) in index])
        block_bytes = sum(p.numel() * p.element_size() for b in self.blocks for p in b.parameters() if not p.is_meta)
        check_fits(self.plan, device, self.plan.host_bytes - block_bytes)  # the store replaces the blocks
        if verbose:
            print(self.plan)
        self.record: StepRecord | None = None
        self.scheduler: HalfScheduler | None = None
        self.dirty = False
        self.workers = HalfWorkers()
        log = _weak_method(self._log)  # the parts hold no reference to the engine: `del engine` frees it
        self.precision = make_precision(AMP_DTYPES[amp] if amp else None, index, device.type == "cuda", log)
        self._place(model)
        # AMP on CUDA: the host-side master update and cast of the next blocks run on a host thread
        # while the GPU computes (the C++ kernel releases the GIL), on host_threads threads; on CPU they
        # run inline.
        self.streamer = BlockStreamer(device, self.precision.stores, prefetch,
                                      self.precision.prepare if amp else None, self.precision.copies_back,
                                      host_thread=amp is not None and device.type == "cuda", log=log,
                                      host_threads=(default_host_threads(device) if host_threads is None
                                                    else host_threads))
        self._hooks: list = []
        self._add_hooks()

    # ------------------------------------------------------------------------------------ set-up
    def _index_params(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (stream, group) of the trainable parameters; refuses parameters not in the model."""
        model_params = {id(p) for p in self.model.parameters()}
        index = {}
        for stream, (p, group) in enumerate(self.opt.unique_params()):
            if id(p) not in model_params:
                raise ValueError(f"zo2.offload: the optimizer's parameter {stream} (shape {tuple(p.shape)}) is not a "
                                 "parameter of the model; build the optimizer from model.parameters()")
            if p.requires_grad:
                index[id(p)] = (stream, group)
        return index

    def _place(self, model: nn.Module) -> None:
        """Blocks into their host stores, block buffers and resident modules onto the device."""
        index = self.precision.index
        self.resident_owners: list[tuple[nn.Module, list[nn.Parameter]]] = []
        source = checkpoint_source(model)  # built by zo2.empty_pretrained: fill from the files, block by block
        if source is not None:
            in_blocks = {id(p) for b in self.blocks for p in b.parameters()}
            source.load(model, named_params(model, skip=in_blocks))
        with torch.no_grad():
            for block in self.blocks:
                if source is not None:
                    source.load(model, named_params(model, [block]))
                self.precision.add_block(block)
                for owner in block.modules():
                    for name, buf in owner.named_buffers(recurse=False):
                        owner._buffers[name] = buf.to(self.device)
            for _, module in resident_modules(model, self.blocks):
                own = list(module.parameters(recurse=False))
                for p in own:
                    if p.device != self.device:
                        p.data = p.data.to(self.device)
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(self.device)
                trained = [p for p in own if id(p) in index]
                if trained:
                    self.resident_owners.append((module, trained))
            in_blocks = {id(p) for b in self.blocks for p in b.parameters()}
            for p in model.parameters():
                if id(p) in in_blocks:
                    continue
                if id(p) in index:
                    self.precision.add_resident(p)
                else:
                    self.precision.add_frozen_resident(p)

    def _add_hooks(self) -> None:
        for b, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, b=b: self._before_block(b)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, b=b: self._after_block(b)))
        for module, _ in self.resident_owners:
            self._hooks.append(module.register_forward_pre_hook(lambda m, a: self._before_resident()))
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

    # -------------------------------------------------------------- compatibility views (read-only)
    @property
    def ring(self):
        """The streamer's ring of device slots (prefer :meth:`time_transfers` to timing it by hand)."""
        return self.streamer.ring

    @property
    def stores(self):
        """The blocks' host stores."""
        return self.precision.stores

    @property
    def resident_slot(self) -> dict[int, int]:
        """Resident block -> ring slot (empty between steps)."""
        return self.streamer.resident_slot

    # ---------------------------------------------------------------------------------- the step
    @property
    def in_step(self) -> bool:
        return self.scheduler is not None

    def run_halves(self, record: StepRecord, closures: Sequence[Closure], check_dropout: bool) -> list[object]:
        """Run ``record``'s 2K halves in lock-step through the blocks (:class:`zo2.optimizer.StepEngine`)."""
        if self.in_step:
            raise RuntimeError("zo2.offload: opt.step was called from inside a closure of the running step")
        if len(closures) != len(record.seeds):
            raise ValueError(f"zo2.offload: step {record.step} has {len(record.seeds)} directions but "
                             f"{len(closures)} closures were given; pass one closure per direction")
        thread_state = ThreadState()  # refuses what the halves' threads cannot reproduce, before anything moves
        self.record = record
        self.scheduler = scheduler = HalfScheduler(record.num_halves, len(self.blocks), on_turn=self._on_turn)
        self.dirty = True
        found: list[str] = []
        try:
            self.precision.begin_step(record)
            self.streamer.start_step()

            def job(half: int) -> object:
                return thread_state.run(lambda: scheduler.run_half(half, closures[half // 2]))

            with record_active_dropout(found) if check_dropout else nullcontext():
                results = self.workers.run([lambda h=h: job(h) for h in range(record.num_halves)], scheduler.abort)
            errors = [v for ok, v in results if not ok and not isinstance(v, HalfAborted)]
            if errors:
                raise errors[0]
            if found:
                raise dropout_error(found)
            losses = [v for _, v in results]  # checked by the optimizer (a scalar, or DPZOSGD's per-sample losses)
            if self.streamer.resident_slot:
                raise RuntimeError(f"zo2.offload: blocks {sorted(self.streamer.resident_slot)} still resident after "
                                   "the step")
        except BaseException:
            self._abort_step()
            raise
        finally:
            self.scheduler = None
        return losses

    def _current_half(self) -> int | None:
        """The half this thread runs in the current step, or None outside one (the model is observed)."""
        return None if self.scheduler is None else self.scheduler.current_half

    def _before_block(self, b: int) -> None:
        half = self._current_half()
        if half is None:
            self._apply_pending()
            self.streamer.observe(b)
            return
        self.scheduler.enter_block(b)
        self.streamer.enter(b)
        self.precision.enter_block(b, self.record, self.record.half_target(half))
        self._log("perturb", b, half=half)
        self._log("compute", b, half=half)

    def _after_block(self, b: int) -> None:
        half = self._current_half()
        if half is None:
            self.streamer.end_observe(b)
        elif half == self.scheduler.num_halves - 1:
            self.precision.released(b, self.record)
            self.streamer.release(b)
            self.streamer.pump()

    def _on_turn(self, half: int) -> None:
        """A half takes the baton: every trainable resident parameter moves to that half's perturbation.

        Moving them on each turn, not when a half enters their owning module, keeps the loss of each half
        at its own point however the model reads them: a weight read directly (ProphetNet's
        ``ngram_embeddings.weight``, Reformer's axial position ``ParameterList``), a module called in the
        prologue and read again after the blocks, or a module the forward never calls (an idle vision
        tower, whose parameters plain ZOSGD still moves by -lr·g·z). A resident weight costs one pass
        per turn, (blocks + 1) · 2q passes a step, instead of one per entry of its module."""
        self.precision.enter_residents(self.record, self.record.half_target(half))

    def _before_resident(self) -> None:
        if self._current_half() is None:  # a resident module called on its own between steps observes
            self._apply_pending()

    def _abort_step(self) -> None:
        """After a failed step: bring every block home, drop this step's perturbation, flush."""
        if self.record is not None:
            self.record.discard()
        self.scheduler = None
        self.streamer.abort(lambda b: self.precision.released(b, self.record))
        self.flush()

    # ----------------------------------------------------------------------------- observation
    def _before_model(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._current_half() is not None:
            self.scheduler.enter_model()
            if self._takes_use_cache and kwargs.get("use_cache") is not False:
                # A KV cache would keep every block's keys and values on the device for each half.
                return args, {**kwargs, "use_cache": False}
            return None
        self._apply_pending()
        self.precision.use_compute_copies()
        self.streamer.begin_observation()
        return None

    def _after_model(self) -> None:
        if self._current_half() is None:
            self.streamer.end_observation()
            self.precision.use_masters()

    def flush(self) -> None:
        """Apply the pending restore and update: every parameter holds its trained value afterwards (and
        blocks left resident by an evaluation forward that raised go home). Between steps it also waits
        for the copies in flight: the caller may write the host stores next (``load_state_dict``), and
        an evaluation forward's uploads from them may still be running on the GPU."""
        if not self.in_step:
            self.streamer.end_observation()
            self.streamer.synchronize()
        self._apply_pending()

    def _apply_pending(self) -> None:
        if not self.dirty:
            return
        if self.in_step:
            raise RuntimeError("zo2.offload: the model was observed (state_dict, flush or a forward outside the "
                               "closure's model call) while a step is running; do that between steps")
        self.streamer.synchronize()
        for b in range(len(self.blocks)):
            self.precision.flush_block(b)
        self.precision.flush_residents()
        self.precision.use_masters()
        self.dirty = False
        self._log("flush", -1)

    def time_transfers(self, rounds: int = 1) -> float:
        """Seconds of one step's worth of transfers alone (every block uploaded and offloaded once, no
        compute), the median over ``rounds``; CUDA events on a GPU, ``time.perf_counter`` on the CPU.
        Call it between steps; the model and the trajectory are unchanged."""
        if self.in_step:
            raise RuntimeError("zo2.offload: time_transfers was called while a step is running; call it between "
                               "steps")
        return self.streamer.time_transfers(rounds)

    def detach(self) -> nn.Module:
        """Flush, remove the hooks and bring every parameter back to the host as a plain module: block
        parameters get their own (pageable) memory and the host stores and staging slots are freed, so
        nothing of the model points into them afterwards."""
        self.flush()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.device.type != "cpu":
                    p.data = p.data.cpu()
            self.precision.release_stores()  # block parameters get their own memory, block by block
            for module in self.model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.cpu()
        self.workers.close()
        self.streamer.close()
        self.opt.detach_engine()
        return self.model
