"""DP training of LoRA adapters only: frozen base weights are neither clipped nor updated, adapters are."""

import torch
from peft import LoraConfig, get_peft_model

import flashdp


def lora_llama(make_llama):
    return get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, init_lora_weights="gaussian"))


def test_dp_lora_clips_and_updates_adapters_only(make_llama, ref):
    model = lora_llama(make_llama)
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(2))
    want, _, groups = ref.per_sample_clipped_sum(model, lambda m, b: m(input_ids=ids[b:b + 1],
                                                                        labels=ids[b:b + 1]).loss, 5, 1.0)
    assert all("lora_" in n for g in groups for n in g)  # the reference's groups: the adapters alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flashdp.make_private(model, max_grad_norm=1.0)
    state = flashdp.privacy_state(model)
    clipped = {state.param_names[id(p)] for g in state.groups for p in g.params}
    assert clipped and all("lora_" in n for n in clipped)
    opt = flashdp.DPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                              noise_multiplier=1.0, expected_batch_size=5, seed=0)
    model(input_ids=ids, labels=ids).loss.backward()
    ref.assert_grads_close(model, want)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"adapter {n} was not updated"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
