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
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from zo2.blocks import find_blocks, resident_modules
from zo2.checks import dropout_error, loss_value, record_active_dropout
from zo2.halves import HalfAborted, HalfScheduler, HalfWorkers, ThreadState
from zo2.optimizer import ZOSGD, Closure
from zo2.plan import AMP_DTYPES, check_fits, plan_offload
from zo2.precision import make_precision
from zo2.streamer import BlockStreamer
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


class OffloadEngine:
    """The streaming engine behind :func:`offload` (use :func:`offload` to build one): the model's hooks,
    the lock-step halves and the step. Where state lives is the precision strategy's
    (:mod:`zo2.precision`), the ring and the copies are the block streamer's (:mod:`zo2.streamer`), and
    the memory plan is :func:`zo2.plan.plan_offload`'s."""

    def __init__(self, model: nn.Module, opt: ZOSGD, device: torch.device, amp: str | None,
                 blocks: str | list[nn.Module] | None, prefetch: int, trace: bool, verbose: bool) -> None:
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
        block_bytes = sum(p.numel() * p.element_size() for b in self.blocks for p in b.parameters())
        check_fits(self.plan, device, self.plan.host_bytes - block_bytes)  # the store replaces the blocks
        if verbose:
            print(self.plan)
        self.record: StepRecord | None = None
        self.scheduler: HalfScheduler | None = None
        self.dirty = False
        self.workers = HalfWorkers()
        self.precision = make_precision(AMP_DTYPES[amp] if amp else None, index, device.type == "cuda", self._log)
        self._place(model)
        # AMP on CUDA: the host-side master update and cast of the next blocks run on a host thread
        # while the GPU computes (the C++ kernel releases the GIL); on CPU they run inline.
        self.streamer = BlockStreamer(device, self.precision.stores, prefetch,
                                      self.precision.prepare if amp else None, self.precision.copies_back,
                                      host_thread=amp is not None and device.type == "cuda", log=self._log)
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
        with torch.no_grad():
            for block in self.blocks:
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

    def run_halves(self, record: StepRecord, closures: Sequence[Closure], check_dropout: bool) -> list[float]:
        """Run ``record``'s 2K halves in lock-step through the blocks (:class:`zo2.optimizer.StepEngine`)."""
        if self.in_step:
            raise RuntimeError("zo2.offload: opt.step was called from inside a closure of the running step")
        thread_state = ThreadState()  # refuses what the halves' threads cannot reproduce, before anything moves
        self.record = record
        self.scheduler = scheduler = HalfScheduler(record.num_halves, len(self.blocks))
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
            losses = [loss_value(v) for _, v in results]
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
            self.flush()
            self.streamer.observe(b)
            return
        self.scheduler.enter_block(b)
        self.streamer.wait(b)
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

    def _before_resident(self, own: list[nn.Parameter]) -> None:
        half = self._current_half()
        if half is None:
            self.flush()
            return
        self.precision.enter_resident(own, self.record, self.record.half_target(half))

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
            if self._takes_use_cache and kwargs.get("use_cache") is not False:
                # A KV cache would keep every block's keys and values on the device for each half.
                return args, {**kwargs, "use_cache": False}
            return None
        self.flush()
        self.precision.use_compute_copies()
        return None

    def _after_model(self) -> None:
        if self._current_half() is None:
            self.precision.use_masters()

    def flush(self) -> None:
        """Apply the pending restore and update: every parameter holds its trained value afterwards."""
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
        self.streamer.close()
        self.opt.detach_engine()
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
    if opt.offload_engine is not None:
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
    opt.attach_engine(engine)
    return engine
