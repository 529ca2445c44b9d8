"""The generic exact fallback: per-sample gradients of one module's own parameters by ``torch.func``.

Any module with trainable parameters that no registered DP layer handles (a custom norm, a Mamba mixer's
``A_log``/``D``, a raw ``nn.Parameter`` read by its owner's forward, MoE experts stored as 3-d tensors) is
made private this way, as Opacus's functorch mode does:

- forward: the module's own forward runs with its own trainable parameters *detached* (so autograd gives
  them no unclipped gradient), its inputs are kept, and its floating outputs pass through an identity
  autograd Function;
- backward, given the output gradients G: the forward is replayed per sample b with ``functional_call``
  and ``vmap(grad(·))`` over the batch, giving ``∇_θ ⟨module(x_b; θ), G_b⟩`` for every sample (a plain
  per-sample loop of ``torch.autograd.grad`` when vmap cannot run the forward); these dense (B, numel)
  gradients are handed to the module's clip group like any other use, so tied groups and modules called
  several times per forward (one use per call, cross terms in the group) are clipped exactly.

During the replay every DP layer inside the module runs its plain forward with detached parameters (their
own clipping happened in the real backward); only the module's *own* parameters are differentiated, and those
of the children it takes over (:mod:`flashdp.takeover`: a parent that reads a child's parameters directly). A
taken parameter is detached in the real forward inside the parent and its per-sample gradients go to the
child's clip group (:func:`theta_keys`; one use per group per forward call), so the clip groups, and the noise
std σ·C_total over them, are what they would be without the take-over.

Cost: one more forward of the module per backward, and the per-sample gradient of its own parameters,
``B × numel`` elements held until the clip (:func:`fallback_bytes`). ``make_private`` warns with the
modules that use it. The fused layers stay the default wherever a registration matches.

Refused with a :class:`~flashdp.errors.FlashDPError` naming the module: an input that is not a tensor or a
plain value (a KV cache object cannot be replayed: pass ``use_cache=False``), random operations in the
forward (dropout in training mode), inputs or buffers modified in place between forward and backward, an
output without the batch dimension that receives a gradient, no input with the batch dimension.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import registry
from .errors import FlashDPError
from .layers_common import in_replay, layer_call, replaying
from .layers_norm import NormUse

__all__ = ["DPFallbackMixin", "FallbackUse", "fallback_bytes", "fallback_class", "theta_keys"]

logger = logging.getLogger("flashdp")

_SIMPLE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size, slice, type(Ellipsis))


class FallbackUse(NormUse):
    """Dense per-sample gradients (B, numel) of a fallback module's own parameters."""


@dataclass(eq=False)
class _Record:
    """What one forward call of a fallback module keeps for its backward."""

    module: nn.Module
    keys: list[str]  # theta_keys(module) at forward
    calls: list[tuple[Any, list[str]]]  # (LayerCall, its keys) per clip group
    leaves: list[Any]  # the flattened (args, kwargs), tensors detached
    spec: Any
    batched: list[int]  # indices of the leaves with the batch dimension
    versions: list[tuple[int, int]]  # (leaf index, _version) of every tensor leaf
    buffer_versions: list[int]
    out_spec: Any
    out_leaves: int
    out_float: list[int]  # indices of the floating output leaves (passed through the capture Function)
    outputs: list[Tensor]  # those leaves as the forward computed them (the replay must reproduce them)


def fallback_bytes(model: nn.Module, batch_size: int) -> int:
    """Bytes of the per-sample gradients the fallback modules of a private ``model`` hold at a batch of B: B × numel
    fp32 per parameter a fallback replay differentiates (each once, also when a parent takes it over from a child
    that is a fallback module itself)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        if isinstance(mod, DPFallbackMixin):
            for k in theta_keys(mod):
                p = _resolve(mod, k)
                seen[id(p)] = p.numel()
    return batch_size * 4 * sum(seen.values())  # fp32 per-sample gradients (FallbackUse)


def _replay_error(module: nn.Module, what: str) -> FlashDPError:
    name = module.__dict__.get("_flashdp_name", type(module).__name__)
    return FlashDPError(
        f"flashdp: module {name!r} ({type(module).__name__}) is clipped by the generic fallback, which replays its "
        f"forward per sample in backward, and {what}. Register a DP layer for it (flashdp.register_layer) or freeze "
        "its parameters."
    )


class DPFallbackMixin:
    """Mixed into a module class with no registered DP layer (see the module docstring)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        keys = theta_keys(self)
        params = tuple(_resolve(self, k) for k in keys)
        plain = super().forward  # type: ignore[misc]
        if in_replay() or not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return plain(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        for leaf in leaves:
            if not isinstance(leaf, (Tensor, *_SIMPLE)) and not callable(leaf):
                raise _replay_error(self, f"its forward got an argument of type {type(leaf).__name__} that it cannot "
                                    "replay (a cache object? pass use_cache=False)")
        groups = _groups_of(self, keys)
        B = groups[0][0].__dict__["_flashdp_group"].runtime.model_batch()
        tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        if B is None:
            B = next((int(t.shape[0]) for _, t in tensors if t.dim() >= 1), None)
        # dim 0 of B rows, or k·B rows: the batch flattened sample-major (MoE routers and experts see (B·T, d))
        batched = [i for i, t in tensors if t.dim() >= 1 and t.shape[0] > 0 and B and t.shape[0] % B == 0]
        if not batched:
            raise _replay_error(self, f"none of its inputs has the batch dimension (dim 0 of size {B}), so its "
                                "per-sample gradients cannot be separated")
        if self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules()):
            raise _replay_error(self, "it has active dropout (random operations cannot be replayed per sample); "
                                "set the dropout probabilities to 0 or call model.eval()")
        # (rows, d) may be the batch flattened sample-major (a view of a batch-first tensor, see layer_call); an
        # input with more dims must have the batch in dim 0: a layout is never guessed from a row count.
        # One call per clip group the replay feeds: the module's own, and each child's it takes over.
        x = leaves[batched[0]]
        calls = []
        for owner, members in groups:
            call = layer_call(owner, x, tuple(params[keys.index(k)] for k in members), min_dim=min(x.dim(), 2))
            if call is not None:
                calls.append((call, members))
        detached = {k: p.detach() for k, p in zip(keys, params, strict=True)}
        with _reparametrize_module(self, detached, tie_weights=False):
            out = plain(*args, **kwargs)
        out_leaves, out_spec = tree_flatten(out)
        out_float = [i for i, t in enumerate(out_leaves) if isinstance(t, Tensor) and t.is_floating_point()]
        if not out_float:
            raise _replay_error(self, "its forward returned no floating-point tensor to differentiate")
        rec = _Record(
            module=self, keys=keys, calls=calls,
            leaves=[t.detach() if isinstance(t, Tensor) else t for t in leaves], spec=spec, batched=batched,
            versions=[(i, t._version) for i, t in tensors], buffer_versions=[b._version for b in self.buffers()],
            out_spec=out_spec, out_leaves=len(out_leaves), out_float=out_float,
            outputs=[out_leaves[i].detach() for i in out_float])
        new = _Capture.apply(rec, len(params), *params, *(out_leaves[i] for i in out_float))
        for i, t in zip(out_float, new, strict=True):
            out_leaves[i] = t
        return tree_unflatten(out_leaves, out_spec)


def theta_keys(module: nn.Module) -> list[str]:
    """The parameters a fallback module's replay differentiates, by their names in the module: its own trainable
    attributes, then ``child.attr`` of each child parameter it takes over (:mod:`flashdp.takeover`)."""
    return [*module.__dict__.get("_flashdp_param_names", {}), *module.__dict__.get("_flashdp_taken", ())]


def _resolve(module: nn.Module, key: str) -> Tensor:
    """The tensor ``module`` holds now under ``key`` (``attr`` or ``child.attr``)."""
    child, _, attr = key.rpartition(".")
    return (module.get_submodule(child) if child else module)._parameters[attr]


def _groups_of(module: nn.Module, keys: list[str]) -> list[tuple[nn.Module, list[str]]]:
    """``(module owning the clip group, its keys)`` per clip group, in key order: a taken-over child's parameters
    stay in the child's group (clip groups are what make_private built, whoever replays the computation)."""
    out: dict[int, tuple[nn.Module, list[str]]] = {}
    for k in keys:
        child = k.rpartition(".")[0]
        owner = module.get_submodule(child) if child else module
        group = owner.__dict__["_flashdp_group"]
        out.setdefault(id(group), (owner, []))[1].append(k)
    return list(out.values())


class _Capture(torch.autograd.Function):
    """Identity on the fallback module's floating outputs; its backward clips the module's own parameters."""

    @staticmethod
    def forward(ctx, rec: _Record, n_params: int, *tensors: Tensor):
        ctx.rec, ctx.n_params = rec, n_params
        ctx.params = tensors[:n_params]
        return tuple(t.clone() for t in tensors[n_params:])

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        rec = ctx.rec
        per = _per_sample_grads(rec, list(grads))
        param_of = dict(zip(rec.keys, ctx.params, strict=True))
        for call, members in rec.calls:
            pairs = [(param_of[k], per[k].reshape(per[k].shape[0], -1).float()) for k in members
                     if param_of[k].requires_grad]
            if pairs:
                call.add_use(FallbackUse(pairs))
        return (None, None, *([None] * ctx.n_params), *grads)


def _per_sample_grads(rec: _Record, grads: list[Tensor | None]) -> dict[str, Tensor]:
    """``attr → (B, *shape)``: ∇_θ ⟨module(x_b; θ), G_b⟩ for every sample b, by vmap (or a loop)."""
    mod = rec.module
    B = rec.calls[0][0].batch_size
    for i, v in rec.versions:
        if rec.leaves[i]._version != v:
            raise _replay_error(mod, "one of its inputs was modified in place after its forward")
    if [b._version for b in mod.buffers()] != rec.buffer_versions:
        raise _replay_error(mod, "its buffers changed between forward and backward (running statistics?)")
    theta = {k: _resolve(mod, k).detach() for k in rec.keys}
    fixed = {n: p.detach() for n, p in mod.named_parameters(remove_duplicate=False) if n not in theta}
    fixed.update({n: b.clone() for n, b in mod.named_buffers(remove_duplicate=False)})  # a replay leaves them intact
    outs = []
    for i, g, y in zip(rec.out_float, grads, rec.outputs, strict=True):
        if g is None:
            continue
        if g.dim() == 0 or g.shape[0] % B or g.shape[0] == 0:
            if bool(g.ne(0).any()):
                raise _replay_error(mod, f"its output {i} of shape {tuple(g.shape)} has no batch dimension (dim 0 of "
                                    f"size {B}) yet receives a gradient, so per-sample gradients cannot be separated")
            continue
        outs.append((i, g, y))
    if not outs:
        return {a: torch.zeros(B, *t.shape, dtype=t.dtype, device=t.device) for a, t in theta.items()}
    xs = [_per_sample(rec.leaves[i], B) for i in rec.batched]
    gs = [_per_sample(g, B) for _, g, _ in outs]

    def loss(th: dict[str, Tensor], xs_b: list[Tensor], gs_b: list[Tensor]) -> Tensor:
        leaves = list(rec.leaves)
        for i, x in zip(rec.batched, xs_b, strict=True):
            leaves[i] = x
        args, kwargs = tree_unflatten(leaves, rec.spec)
        with replaying():
            out = torch.func.functional_call(mod, {**fixed, **th}, tuple(args), kwargs, tie_weights=False,
                                             strict=False)
        out_leaves = tree_flatten(out)[0]
        total = None
        for (i, _, _), g in zip(outs, gs_b, strict=True):
            o = out_leaves[i]
            if o.shape != g.shape:
                raise _replay_error(mod, f"its output {i} replayed on one sample has shape {tuple(o.shape)}, not "
                                    f"{tuple(g.shape)}: its samples are not independent along dim 0")
            term = (o * g.to(o.dtype)).sum()
            total = term if total is None else total + term
        return total, [out_leaves[i].detach() for i, _, _ in outs]

    try:
        per, ys = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(None, 0, 0),
                                  randomness="error")(theta, xs, gs)
        _check_replay(mod, outs, ys, B)
        return per
    except FlashDPError:
        raise
    except RuntimeError as e:
        if "randomness" in str(e):
            raise _replay_error(mod, "its forward uses random operations, which cannot be replayed per sample "
                                "(dropout? call model.eval() or set its probability to 0)") from e
        logger.debug("flashdp: vmap cannot replay %s (%s); per-sample loop instead", type(mod).__name__, e)
    rows: dict[str, list[Tensor]] = {a: [] for a in theta}
    ys_rows: list[list[Tensor]] = []
    for b in range(B):
        with torch.enable_grad():
            th = {a: t.clone().requires_grad_(True) for a, t in theta.items()}
            val, ys_b = loss(th, [x[b] for x in xs], [g[b] for g in gs])
            # an output that does not depend on θ in this sample's replay (a branch the sample does not take): zero
            got = torch.autograd.grad(val, list(th.values()), allow_unused=True) if val.requires_grad else \
                [None] * len(th)
        for (a, t), g in zip(th.items(), got, strict=True):
            rows[a].append(torch.zeros_like(t) if g is None else g)
        ys_rows.append(ys_b)
    _check_replay(mod, outs, [torch.stack(col) for col in zip(*ys_rows, strict=True)], B)
    return {a: torch.stack(r) for a, r in rows.items()}


def _check_replay(mod: nn.Module, outs: list, ys: list[Tensor], B: int) -> None:
    """Refuse if the per-sample replay does not reproduce the forward's outputs: dim 0 is then not (or not only)
    the samples, e.g. Llama 4's experts see their tokens repeated expert-major, (E·B·T, d). Rounding of the
    batched against the per-sample computation is far below 1024 units of the dtype's precision of the largest
    output; a wrong sample layout mixes rows and is off by the values themselves."""
    for (i, _, y), got in zip(outs, ys, strict=True):
        want = _per_sample(y, B)
        scale = float(want.abs().max()) if want.numel() else 0.0
        tol = 1024 * torch.finfo(want.dtype).eps * scale
        if got.shape != want.shape or (want.numel() and float((got.to(want.dtype) - want).abs().max()) > tol):
            raise _replay_error(mod, f"replaying it one sample at a time does not reproduce its output {i}: dim 0 of "
                                "its inputs is not the batch flattened sample-major (samples mixed in one row, or "
                                "rows ordered another way)")


def _per_sample(t: Tensor, B: int) -> Tensor:
    """(k·B, ...) → (B, k, ...): sample b's rows (sample-major), as the module sees one sample's input."""
    return t.reshape(B, t.shape[0] // B, *t.shape[1:])


_classes: dict[type, type] = {}
_classes_lock = threading.Lock()


def fallback_class(cls: type) -> type:
    """The class ``DP<Name>`` with bases ``(DPFallbackMixin, cls)`` a fallback module is swapped to."""
    if issubclass(cls, DPFallbackMixin):
        return cls
    with _classes_lock:
        gen = _classes.get(cls)
        if gen is None:
            name = f"DP{cls.__name__}"
            gen = type(name, (DPFallbackMixin, cls), {"__module__": __name__, "__qualname__": name})
            _classes[cls] = gen
            globals().setdefault(name, gen)  # so pickle can find it in this process
            registry.mark_converted(gen)
    return gen
