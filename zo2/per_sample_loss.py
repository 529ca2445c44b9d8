"""Per-sample losses for private zeroth-order steps: what a :class:`zo2.DPZOSGD` closure returns.

A private step clips each sample's loss difference, so the closure must return one loss per sample (a
1-D tensor of length B), not the batch mean. For a causal language model::

    def closure():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return zo2.per_sample_lm_loss(logits, batch["labels"])   # shape (B,)

:func:`per_sample_values` checks what a closure returned and says how to fix it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PER_SAMPLE_HOWTO", "per_sample_lm_loss", "per_sample_values"]

PER_SAMPLE_HOWTO = (
    "compute the loss with reduction='none' and average each sample's tokens, e.g.\n"
    "    logits = model(input_ids=ids, attention_mask=mask).logits\n"
    "    return zo2.per_sample_lm_loss(logits, labels)  # (B,): each sample's mean over its labelled tokens\n"
    "or, by hand: tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), "
    "reduction='none').view(B, -1); keep = labels[:, 1:] != -100; "
    "return (tok * keep).sum(1) / keep.sum(1).clamp(min=1)"
)


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                       shift: bool = True) -> torch.Tensor:
    """Each sample's mean cross-entropy over its labelled tokens, as Hugging Face's causal-LM loss per sample.

    Args:
        logits: (B, T, V) scores.
        labels: (B, T) token ids; ``ignore_index`` marks tokens without a label (padding, prompt).
        ignore_index: the label of ignored tokens (-100, as Hugging Face).
        shift: predict token t+1 from position t (a causal LM given ``labels = input_ids``, as Hugging Face
            shifts inside the model); False when the labels are already aligned with the logits.

    Returns:
        (B,) float32 losses (float64 for float64 logits). A sample with no labelled token has loss 0: it
        contributes nothing to the step (its loss difference is 0).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"zo2.per_sample_lm_loss: expected logits (B, T, V) and labels (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    b, t = labels.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tokens = F.cross_entropy(logits.reshape(b * t, -1).to(dtype), labels.reshape(-1), reduction="none",
                             ignore_index=ignore_index).view(b, t)
    keep = labels != ignore_index
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)


def per_sample_values(result: object) -> torch.Tensor:
    """A closure's per-sample losses as a float64 CPU tensor of shape (B,), or an error naming the fix."""
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"DPZOSGD.step: the closure returned {type(result).__name__}; it must return one loss per "
                        f"sample, a 1-D tensor of length B: {PER_SAMPLE_HOWTO}")
    if result.dim() != 1:
        what = "a scalar loss" if result.dim() == 0 else f"a tensor of shape {tuple(result.shape)}"
        raise ValueError(f"DPZOSGD.step: the closure returned {what}; a private step clips each sample's "
                         f"contribution, so it needs one loss per sample, a 1-D tensor of length B: "
                         f"{PER_SAMPLE_HOWTO}")
    if result.requires_grad:
        raise ValueError("DPZOSGD.step: the closure's losses require grad; zo2 runs the closure under "
                         "torch.no_grad() and needs no backward: remove torch.enable_grad() and loss.backward()")
    if not result.is_floating_point():
        raise TypeError(f"DPZOSGD.step: the closure returned {result.dtype} losses; return floating-point losses")
    return result.detach().to("cpu", torch.float64)
