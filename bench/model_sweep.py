"""The model sweep: zo2 and flashdp on every causal LM architecture transformers can build at a tiny size.

    memtrain-bench model-sweep --out bench/results/model-sweep            # every entry of the mapping
    memtrain-bench model-sweep --models llama,mixtral,gemma --out /tmp/s  # a few
    python -m memtrain.bench.model_sweep --table bench/results/model-sweep/sweep.json   # the README table

Each ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` entry is built from its config with small sizes (hidden 32, two
layers, vocabulary 96, four experts; :func:`tiny_config`), random init, eval mode, in its own process with a
time limit (a hang or a crash costs one row). Columns, each "exact", "DIFFERS" (with the error and the
tolerance) or "refused"/"error" with the message:

- ``zo2.ZOSGD``: one step of a float64 model against the textbook MeZO step (``memtrain.testing``: z from the
  independent NumPy Philox, every z stored) — the updated parameters and the projected gradient;
- ``zo2.offload(device="cpu")``: two steps with the offload engine against plain ZOSGD with the same seed,
  float64 — the flushed parameters and both projected gradients;
- ``flashdp.make_private``: the per-sample clipped gradient sum of a float32 model against a per-sample
  loop (``torch.autograd.grad`` of each sample's own loss on an unmodified copy, clipped per group in
  Python) in float64; the modules that took the generic fallback are listed.

Nothing here is timed; the JSON is deterministic up to library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from typing import Any

import torch
from torch import nn

__all__ = ["run_one", "supported_models_markdown", "sweep", "sweep_markdown", "tiny_config"]

B, T = 3, 7  # samples and tokens per sample of the checks (odd, small: every column runs per-sample loops)
VOCAB = 96
SEED = 0
U64 = 2.0**-53  # unit roundoff of float64
U32 = 2.0**-24  # unit roundoff of float32
MAX_PARAMS = 3_000_000  # above this the config was not shrunk (a size key we do not know): skipped

# Sizes set wherever a config has the key. Per-head sizes stay even (rotary), heads divide the width.
TINY: dict[str, Any] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "embed_dim": 32, "n_embed": 32, "model_dim": 32,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "num_decoder_layers": 2,
    "decoder_layers": 2, "encoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2,
    "multi_query_group_num": 2, "head_dim": 8, "kv_channels": 8, "d_kv": 8,
    "intermediate_size": 48, "ffn_dim": 48, "n_inner": 48, "d_ff": 48, "decoder_ffn_dim": 48, "encoder_ffn_dim": 48,
    "ffn_hidden_size": 48, "inner_hidden_size": 48, "mlp_dim": 48,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "seq_length": 64, "max_seq_len": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    "n_shared_experts": 1, "num_shared_experts": 1, "expert_interval": 1, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16,
    "state_size": 8, "d_state": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 4, "conv_kernel": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "n_groups": 1, "mamba_expand": 2, "expand": 2,
    "num_global_tokens": 0, "sliding_window": 16, "attention_window": 8, "local_attn_window": 8,
    "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [16, 16], "chunk_size_lm_hash": 8, "local_attn_chunk_length": 8,
    "lsh_attn_chunk_length": 8, "num_buckets": 4, "image_size": 32, "patch_size": 8, "vision_config": None,
    "num_channels": 3, "rope_theta": 10000.0, "use_cache": False, "tie_word_embeddings": None,
}
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "unk_token_id")
_DROPOUT_WORDS = ("dropout", "drop_rate", "pdrop", "dropout_rate", "drop_prob")


def _shrink(cfg_cls: type, base: Any) -> dict[str, Any]:
    """Constructor kwargs that make ``cfg_cls`` tiny (keys its default instance has)."""
    have = base.to_dict() if hasattr(base, "to_dict") else {}
    out: dict[str, Any] = {}
    for k, v in TINY.items():
        if k in have and v is not None:
            out[k] = v
    for k, v in have.items():
        if any(w in k for w in _DROPOUT_WORDS) and isinstance(v, float):
            out[k] = 0.0
        if k.endswith("_token_id") and isinstance(v, int) and v >= VOCAB - 4:
            out[k] = VOCAB - 1 - _TOKEN_KEYS.index(k) if k in _TOKEN_KEYS else VOCAB - 1
        if k == "layer_types" and isinstance(v, list):
            out[k] = v[:2]
        if k.endswith("_config") and hasattr(getattr(base, k, None), "to_dict"):
            sub = getattr(base, k)
            out[k] = {**sub.to_dict(), **_shrink(type(sub), sub)}
    return out


def tiny_config(model_type: str) -> Any:
    """The config of ``model_type`` with small sizes (see :data:`TINY`), dropout 0 and token ids in the vocab."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    return type(base)(**_shrink(type(base), base))


def build(model_type: str, dtype: torch.dtype) -> nn.Module:
    """The tiny causal LM of ``model_type`` in eval mode, seeded, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # MoE experts as a loop over nn-style experts: torch's grouped GEMM has no float64
            model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
        except (ValueError, TypeError):
            model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise _Skip(f"not shrunk by the sweep's config keys: {n} parameters")
    return model.to(dtype).eval()


class _Skip(Exception):
    """The architecture cannot be built tiny (or run on text alone): a skipped row with the reason."""


def batch(model: nn.Module) -> torch.Tensor:
    """(B, T) token ids below the vocabulary, avoiding the special token ids, seeded."""
    g = torch.Generator().manual_seed(SEED + 1)
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else VOCAB
    return torch.randint(4, max(5, min(vocab, VOCAB) - 10), (B, T), generator=g)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss (a mean over the batch's tokens) on ``ids`` as labels."""
    out = model(input_ids=ids, labels=ids, use_cache=False)
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise _Skip("the model returned no loss for labels=input_ids")
    return loss


def _msg(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:400]


def ulp32(x: float) -> float:
    """One float32 ulp at |x|: Hugging Face losses are computed from float32 logits (``logits.float()``) even for
    float64 weights, so each loss is a float32 value and L+ − L− of two points can be off by one ulp each: the
    projected gradient by up to 2 ulp / 2ε."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 23) if x else 0.0


def rounding_noise(model: nn.Module, ids: torch.Tensor, step: float) -> float:
    """max |L(θ + δ) − L(θ)| over two draws of δ = ±``step`` per element (random signs), θ restored exactly.

    zo2's kernels form their terms a·z in float32 by design, so the points at which zo2 evaluates the loss
    differ from the float64 reference's by about u32·|a·z| per element. Many models compute parts of their
    forward in float32 even with float64 weights (norms, router softmax, SSM scans), so such a shift can move
    the loss by float32 roundings of |L| rather than by ∇L·δ. This measures that floor on the model itself."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(SEED + 2)
    out = 0.0
    with torch.no_grad():
        base = float(loss_of(model, ids))
        for _ in range(2):
            for p in params:
                p.add_(step * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype))
            out = max(out, abs(float(loss_of(model, ids)) - base))
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
    return out


# -- zo2 -------------------------------------------------------------------------------------------------------
def check_zosgd(model_type: str) -> dict[str, Any]:
    """One zo2.ZOSGD step of a float64 model against the textbook MeZO step."""
    import zo2
    from memtrain.testing import mezo_step_reference, zo_step_seeds

    model = build(model_type, torch.float64)
    ref = copy.deepcopy(model)
    ids = batch(model)
    lr, eps = 1e-2, 1e-3
    opt = zo2.ZOSGD(model.parameters(), lr=lr, eps=eps, seed=SEED)
    with torch.no_grad():
        opt.step(lambda: loss_of(model, ids))
    # ZOSGD perturbs the trainable parameters only; a parameter's noise stream is its position among all of them
    everything = list(dict.fromkeys(ref.parameters()))
    streams = [i for i, p in enumerate(everything) if p.requires_grad]
    params = [everything[i] for i in streams]
    with torch.no_grad():
        _, diffs = mezo_step_reference(params, lambda: loss_of(ref, ids), zo_step_seeds(SEED, 0, 1),
                                       streams, [(lr, eps, 0.0)] * len(params))
    g_ref = diffs[0] / eps
    err_g = abs(opt.projected_grad - g_ref)
    with torch.no_grad():
        err_p = max(float((a - b).abs().max()) for a, b in zip(dict.fromkeys(model.parameters()),
                                                                dict.fromkeys(ref.parameters()), strict=True))
        loss = abs(float(loss_of(ref, ids)))
        theta = max(float(p.abs().max()) for p in params)
    # Both sides are float64 with z from one Philox stream: the loss difference L+ − L− carries the rounding of
    # the two forwards, ~64·u64·|L| each (a few dozen roundings per output, |L| ≈ log V), divided by 2ε. zo2's
    # kernels form the terms a·z (a = ±ε, −lr·g) in float32 by design (csrc/zo_cpu.cpp), so each update
    # element carries up to 2·u32·lr·|g|·max|z| (max|z| < 6.5 for the element counts here) plus ulps of θ.
    # The two losses of each side sit at points ~2·u32·ε·|z| apart (|z| ≈ 3 at most for most elements): their
    # difference is bounded by the measured rounding floor of the model (rounding_noise), twice (L+ and L−),
    # over 2ε, with a factor 2 for the two random draws standing in for the worst case.
    noise = rounding_noise(ref, ids, 2 * U32 * eps * 3)
    tol_g = 64 * U64 * loss / eps + U32 * abs(g_ref) + 2 * noise / eps + ulp32(loss) / eps + 1e-12
    tol_p = lr * (tol_g + 2 * U32 * abs(g_ref)) * 6.5 + 4 * U64 * theta
    ok = err_g <= tol_g and err_p <= tol_p
    return {"status": "exact" if ok else "DIFFERS", "err_grad": err_g, "tol_grad": tol_g, "err_params": err_p,
            "tol_params": tol_p, "rounding_noise": noise}


def check_offload(model_type: str) -> dict[str, Any]:
    """Two steps with zo2.offload(device="cpu") against plain ZOSGD, same seed, float64."""
    import zo2

    plain = build(model_type, torch.float64)
    off = copy.deepcopy(plain)
    ids = batch(plain)
    lr, eps = 1e-2, 1e-3
    opt_p = zo2.ZOSGD(plain.parameters(), lr=lr, eps=eps, seed=SEED)
    opt_o = zo2.ZOSGD(off.parameters(), lr=lr, eps=eps, seed=SEED)
    try:
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zo2.offload(off, opt_o, device="cpu", verbose=False)
    except Exception as e:  # the refusal is the row
        return {"status": "refused", "message": _msg(e)}
    gs_p, gs_o = [], []
    with torch.no_grad():
        for _ in range(2):
            opt_p.step(lambda: loss_of(plain, ids))
            gs_p.append(opt_p.projected_grad)
            opt_o.step(lambda: loss_of(off, ids))
            gs_o.append(opt_o.projected_grad)
        opt_o.flush()
        err_g = max(abs(a - b) for a, b in zip(gs_p, gs_o, strict=True))
        err_p = max(float((a - b).abs().max()) for a, b in zip(dict.fromkeys(plain.parameters()),
                                                                dict.fromkeys(off.parameters()), strict=True))
        loss = abs(float(loss_of(plain, ids)))
        theta = max(float(p.abs().max()) for p in plain.parameters())
    # The engine applies the same terms in other passes (the update of step 1 fused with step 2's +εz): each
    # pass forms its Σ a·z in float32 (csrc/zo_cpu.cpp), so θ may differ by 2·u32·(lr·|g| + ε)·max|z| per
    # step (max|z| < 6.5 here); both engines run the same float64 forwards at the same points otherwise.
    g_max = max(abs(g) for g in gs_p)
    noise = rounding_noise(plain, ids, 2 * U32 * (lr * g_max + eps) * 3)  # see check_zosgd
    tol_g = 64 * U64 * loss / eps + 2 * noise / eps + ulp32(loss) / eps + 1e-12
    tol_p = 2 * (2 * U32 * (lr * g_max + eps) * 6.5) + lr * tol_g * 6.5 + 16 * U64 * theta
    ok = err_g <= tol_g and err_p <= tol_p
    return {"status": "exact" if ok else "DIFFERS", "err_grad": err_g, "tol_grad": tol_g, "err_params": err_p,
            "tol_params": tol_p, "rounding_noise": noise}


# -- flashdp ---------------------------------------------------------------------------------------------------
def reference_groups(model: nn.Module) -> list[list[str]]:
    """Clip groups by parameter name: a module's trainable parameters, merged where a parameter is shared;
    a parameter a module shares with its own submodule (``decoder.bias = self.bias``) counts for the submodule."""
    names = {id(p): n for n, p in model.named_parameters()}
    mods = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for path, mod in mods.items():
        for p in mod._parameters.values():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(path)
    by_module: dict[str, set[int]] = {}
    for pid, paths in owners.items():
        for a in paths:
            if not any(a != b and (a == "" or b.startswith(a + ".")) for b in paths):
                by_module.setdefault(a, set()).add(pid)
    groups: list[set[int]] = []
    for ids in by_module.values():
        merged = [g for g in groups if g & ids]
        for g in merged:
            groups.remove(g)
            ids = ids | g
        groups.append(set(ids))
    return [sorted(names[i] for i in g) for g in groups]


def per_sample_grads(model: nn.Module, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient (the gradient of its own loss) by name, one backward per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for b in range(ids.shape[0]):
        grads = torch.autograd.grad(loss_of(model, ids[b:b + 1]), list(params.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads,
                                                                                    strict=True)})
    return out


def clipped_sum(per: list[dict[str, torch.Tensor]], groups: list[list[str]], c_l: float) -> dict[str, torch.Tensor]:
    """Σ_b min(1, C_l / (‖g_b,group‖ + 1e-6)) g_b per group (flashdp's clip rule), in the grads' dtype."""
    out = {n: torch.zeros_like(g) for n, g in per[0].items()}
    for g in per:
        for grp in groups:
            norm = math.sqrt(sum(float(g[n].double().square().sum()) for n in grp))
            c = min(1.0, c_l / (norm + 1e-6))
            for n in grp:
                out[n] += c * g[n]
    return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def batched_rounding(model: nn.Module, ids: torch.Tensor, per: list[dict[str, torch.Tensor]],
                     want: dict[str, torch.Tensor]) -> float:
    """Plain PyTorch's rounding of a batched gradient against the per-sample loop, at the scale of the clipped sum:
    per parameter, max |B·∇L(batch) − Σ_b ∇L_b| relative to max |Σ_b ∇L_b| (the model's loss is a mean over the
    batch's tokens, every sample has T of them), times max |want|; the largest over the parameters. Zero up to
    float64 rounding unless the model computes in float32 inside whatever its dtype."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss_of(model, ids), list(params.values()), allow_unused=True)
    B = ids.shape[0]
    out = 0.0
    for n, g in zip(params, grads, strict=True):
        total = sum(s[n] for s in per)
        size = float(total.abs().max())
        if g is not None and size > 0:
            out = max(out, float((B * g - total).abs().max()) / size * float(want[n].abs().max()))
    return out


def check_flashdp(model_type: str) -> dict[str, Any]:
    """flashdp's per-sample clipped gradient sum (float32) against the per-sample loop in float64."""
    import flashdp

    model = build(model_type, torch.float32)
    ids = batch(model)
    groups = reference_groups(model)
    with _default_dtype(torch.float64):  # tensors the forward creates are float64 too (XGLM's finfo(dtype).min)
        per64 = per_sample_grads(copy.deepcopy(model).double(), ids)
    norms = sorted(math.sqrt(sum(float(g[n].square().sum()) for n in grp)) for g in per64 for grp in groups)
    c_l = norms[len(norms) // 2] or 1.0  # the median group norm: some groups clipped, some not
    C = c_l * math.sqrt(len(groups))
    want = clipped_sum(per64, groups, c_l)
    base = clipped_sum(per_sample_grads(copy.deepcopy(model), ids), groups, c_l)  # plain torch, float32
    with _default_dtype(torch.float64):
        err_batch = batched_rounding(copy.deepcopy(model).double(), ids, per64, want)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            flashdp.make_private(model, C)
        except Exception as e:  # the refusal is the row
            return {"status": "refused", "message": _msg(e)}
    fell = [str(w.message).split("clip): ", 1)[-1].split(". flashdp.fallback_bytes", 1)[0]
            for w in caught if issubclass(w.category, flashdp.FallbackWarning)]
    try:
        loss_of(model, ids).backward()
    except Exception as e:
        return {"status": "error", "message": _msg(e), "fallback": fell}
    got = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
           if p.requires_grad}
    scale = max(float(w.abs().max()) for w in want.values())
    err = max(float((got[n].double() - want[n]).abs().max()) for n in want)
    err32 = max(float((base[n].double() - want[n]).abs().max()) for n in want)
    # flash-attention's rule: a float32 implementation's error against float64 is at most about twice that of
    # plain PyTorch float32, plus a few float32 roundings of the largest entry for the clipped sum's own
    # accumulation order. Plain PyTorch's error is the larger of the same per-sample loop on an unmodified float32
    # copy and, since flashdp's per-sample gradients come out of one batched forward and backward, plain PyTorch's
    # batched gradient against the loop's sum: both float64, they differ only where the model computes in float32
    # whatever its dtype (Qwen3-Next-style gated delta rules, float32 norms), whose reductions then run over B·T
    # rows instead of T. A clipping error is of the size of the gradients themselves, far above either.
    tol = 2 * max(err32, err_batch) + 8 * U32 * scale
    return {"status": "exact" if err <= tol else "DIFFERS", "err": err, "tol": tol, "torch_fp32_err": err32,
            "torch_batched_err": err_batch, "groups": len(groups), "fallback": fell}


COLUMNS: dict[str, Callable[[str], dict[str, Any]]] = {
    "zo2.ZOSGD": check_zosgd, "zo2.offload": check_offload, "flashdp": check_flashdp}


def run_one(model_type: str, columns: list[str] | None = None) -> dict[str, Any]:
    """Every column for one architecture (in this process)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    row: dict[str, Any] = {"model_type": model_type, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)}
    try:
        model = build(model_type, torch.float32)
        row["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            loss_of(model, batch(model))
    except _Skip as e:
        return {**row, "skipped": str(e)}
    except Exception as e:  # cannot build tiny or cannot run on text: the reason is the row
        return {**row, "skipped": _msg(e)}
    for col in columns or list(COLUMNS):
        t0 = time.perf_counter()
        try:
            row[col] = COLUMNS[col](model_type)
        except Exception as e:
            row[col] = {"status": "error", "message": _msg(e)}
        row[col]["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def sweep(names: list[str], timeout: float, columns: list[str] | None = None,
          progress: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """:func:`run_one` for each architecture in a worker process (one import of torch and transformers for many
    rows), ``timeout`` seconds per architecture: a row that overruns or kills the worker is recorded as crashed
    and a fresh worker goes on with the next architecture."""
    rows: list[dict[str, Any]] = []
    todo = list(names)
    while todo:
        cmd = [sys.executable, "-P", "-m", "memtrain.bench.model_sweep", "--worker", ",".join(todo),
               "--timeout", str(timeout)]
        if columns:
            cmd += ["--columns", ",".join(columns)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(p: subprocess.Popen = proc, q: queue.Queue = lines) -> None:
            for ln in p.stdout:
                q.put(ln)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        limit = timeout + 120  # the worker's own alarm fires first; this catches a hang in C code or an import
        while todo:
            try:
                line = lines.get(timeout=limit)
            except queue.Empty:
                line = None
                proc.kill()
            if line is None:  # the worker died or hung on todo[0]
                proc.wait()
                row = {"model_type": todo.pop(0), "crashed": f"the worker died or hung (exit {proc.returncode})"}
            elif line.startswith("{"):
                row = json.loads(line)
                if todo and row.get("model_type") == todo[0]:
                    todo.pop(0)
                else:
                    continue
            else:
                continue
            rows.append(row)
            if progress:
                progress(row)
            if line is None:
                break
        proc.kill()
        proc.wait()
    return rows


def _worker(names: list[str], timeout: float, columns: list[str] | None) -> None:
    """Print one JSON row per architecture, each under an alarm of ``timeout`` seconds."""
    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result within {timeout:.0f} s")

    signal.signal(signal.SIGALRM, alarm)
    for name in names:
        signal.alarm(int(timeout))
        try:
            row = run_one(name, columns)
        except TimeoutError as e:
            row = {"model_type": name, "crashed": str(e)}
        finally:
            signal.alarm(0)
        print(json.dumps(row), flush=True)


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    s = c["status"]
    if s == "exact":
        err = c.get("err", c.get("err_grad"))
        return f"exact ({err:.1e})" if err is not None else "exact"
    if s == "DIFFERS":
        err, tol = c.get("err", c.get("err_grad")), c.get("tol", c.get("tol_grad"))
        return f"**DIFFERS** ({err:.1e} > {tol:.1e}; params {c.get('err_params', 0):.1e})"
    return f"{s}: {c.get('message', '')[:140]}".replace("|", "/")


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per column that was run (``--columns`` may pick some): built (rows not skipped), exact, DIFFERS,
    refused/error."""
    built = [r for r in rows if r.get(next(iter(COLUMNS))) is not None or any(c in r for c in COLUMNS)]
    out = {}
    for col in COLUMNS:
        cells = [r[col] for r in built if col in r]
        if not cells:
            continue
        out[col] = {"built": len(built), "exact": sum(c["status"] == "exact" for c in cells),
                    "DIFFERS": sum(c["status"] == "DIFFERS" for c in cells),
                    "refused_or_error": sum(c["status"] in ("refused", "error") for c in cells)}
    return out


def sweep_markdown(doc: dict[str, Any]) -> str:
    """The full table: one row per architecture, every column, the fallback modules, skips with their reason."""
    rows = doc["rows"]
    lines = ["| columns | built | exact | DIFFERS | refused/error |", "|---|---|---|---|---|"]
    for col, s in doc["summary"].items():
        lines.append(f"| {col} | {s['built']} | {s['exact']} | {s['DIFFERS']} | {s['refused_or_error']} |")
    cols = [c for c in COLUMNS if c in doc["summary"]]  # the columns run
    lines += ["", "| model_type | class | params | " + " | ".join(cols) + " | flashdp fallback modules |",
              "|---" * (4 + len(cols)) + "|"]
    skipped = []
    for r in rows:
        if "skipped" in r or "crashed" in r:
            skipped.append(r)
            continue
        fb = "; ".join((r.get("flashdp") or {}).get("fallback", []))[:300] or "-"
        lines.append(f"| {r['model_type']} | {r.get('class')} | {r.get('params', '')} | "
                     + " | ".join(_cell(r.get(c)) for c in cols) + f" | {fb} |")
    if skipped:
        lines += ["", "Not built tiny (or not run on text alone):", ""]
        lines += [f"- {r['model_type']}: {(r.get('skipped') or r.get('crashed') or '')[:200]}" for r in skipped]
    return "\n".join(lines) + "\n"


def supported_models_markdown(doc: dict[str, Any]) -> str:
    """The compact "supported models" table for the README: per column, accepted and exact counts, then the
    architectures that are not exact in some column."""
    s = doc["summary"]
    lines = [f"Every causal LM of transformers {doc.get('transformers', '?')} that builds at a tiny size "
             f"({next(iter(s.values()))['built']} architectures; `memtrain-bench model-sweep`):", "",
             "| | accepted | exact | silently different |", "|---|---|---|---|"]
    for col, c in s.items():
        acc = c["exact"] + c["DIFFERS"]
        lines.append(f"| `{col}` | {acc} / {c['built']} | {c['exact']} | {c['DIFFERS']} |")
    bad = [(r["model_type"], col, r[col]["status"]) for r in doc["rows"] for col in COLUMNS
           if isinstance(r.get(col), dict) and r[col]["status"] != "exact"]
    if bad:
        lines += ["", "Not exact: " + ", ".join(f"{m} ({col}: {st})" for m, col, st in bad) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``memtrain-bench model-sweep`` (and ``--one NAME``: one row as JSON, the worker of the sweep)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ap = argparse.ArgumentParser(prog="memtrain-bench model-sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated model types (None: every causal LM)")
    ap.add_argument("--columns", default=None, help=f"comma-separated subset of {', '.join(COLUMNS)}")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per architecture")
    ap.add_argument("--out", default="bench-runs/model-sweep", help="folder for sweep.json and sweep.md")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print the README table from a sweep.json and exit")
    args = ap.parse_args(argv)
    columns = args.columns.split(",") if args.columns else None
    if args.table:
        print(supported_models_markdown(json.loads(pathlib.Path(args.table).read_text())), end="")
        return
    if args.one or args.worker:
        import transformers

        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        _worker((args.one or args.worker).split(","), args.timeout, columns)
        return
    import transformers

    names = args.models.split(",") if args.models else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [n for n in names if n not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        ap.error(f"not causal-LM model types of transformers {transformers.__version__}: {unknown}")

    def show(row: dict) -> None:
        cells = "  ".join(f"{c}={row[c]['status']}" for c in COLUMNS if isinstance(row.get(c), dict))
        print(f"{row['model_type']:28s} {cells or 'skipped: ' + str(row.get('skipped') or row.get('crashed'))[:100]}",
              flush=True)

    rows = sweep(names, args.timeout, columns, show)
    doc = {"command": "memtrain-bench model-sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
           "transformers": transformers.__version__, "torch": torch.__version__, "batch": B, "tokens": T,
           "rows": rows}
    doc["summary"] = summary(rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "sweep.md").write_text(sweep_markdown(doc))
    print(supported_models_markdown(doc), end="")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")


if __name__ == "__main__":
    main()
