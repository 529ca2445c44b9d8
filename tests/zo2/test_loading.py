"""zo2.empty_pretrained + zo2.offload: a model filled from a local checkpoint block by block trains exactly
like the same checkpoint loaded whole (from_pretrained) and offloaded: same parameters after loading, same
losses and parameters after steps, bit for bit (the same bytes reach the same engine, so the tolerance is
0). Checkpoints in bf16 loaded as the fp32 master (AMP), sharded and single-file, tied and untied."""

import pytest
import torch

import zo2

from .conftest import tiny_llama, tiny_opt


def batch(seed: int):
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train(model, amp, steps=3):
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=5)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, verbose=False)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [batch(s) for s in range(steps)]
    losses = [opt.step(lambda b=b: model(**b).loss).item() for b in batches]
    engine.detach()
    return loaded, losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("builder", "ckpt_dtype", "amp", "shard"), [
    (tiny_opt, torch.bfloat16, "bf16", "2KB"),  # tied embedding / head, 16-bit file into the fp32 master
    (tiny_llama, torch.float32, None, None),  # single file, untied head, rotary buffers built, not loaded
    (tiny_llama, torch.bfloat16, "bf16", "4KB"),
])
def test_block_by_block_load_trains_like_the_whole_checkpoint(tmp_path, builder, ckpt_dtype, amp, shard):
    from transformers import AutoModelForCausalLM

    model = builder().to(ckpt_dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    dtype = torch.float32 if amp else ckpt_dtype
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    empty = zo2.empty_pretrained(tmp_path, torch_dtype=dtype)
    assert all(p.is_meta for p in empty.parameters())
    ref_loaded, ref_losses, ref_params = train(whole, amp)
    loaded, losses, params = train(empty, amp)
    for k, v in ref_loaded.items():
        assert torch.equal(loaded[k], v), k
    assert losses == ref_losses
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), k


def test_a_checkpoint_that_does_not_match_the_model_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_opt().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(k for k in tensors if "layers.1." in k and k.endswith("fc1.weight"))
    del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = zo2.empty_pretrained(tmp_path)
    with pytest.raises(KeyError, match=r"fc1\.weight"):
        zo2.offload(model, zo2.ZOSGD(model.parameters(), lr=1e-3), device="cpu", verbose=False)


def test_a_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        zo2.empty_pretrained(tmp_path)
