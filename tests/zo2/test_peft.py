"""ZO fine-tuning of LoRA adapters only: the frozen base weights stay bit for bit what they were."""

import torch
from peft import LoraConfig, get_peft_model

import zo2


def test_zosgd_trains_only_lora_adapters(make_opt, batch):
    model = get_peft_model(make_opt(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, init_lora_weights="gaussian"))
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all parameters handed over, as a user would: ZOSGD perturbs only those that require grad
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=3)
    seen_perturbed = []

    def closure():
        seen_perturbed.append([n for n, p in model.named_parameters() if n not in trainable
                               and not torch.equal(p, before[n])])
        return model(**batch).loss

    for _ in range(3):
        opt.step(closure)
    assert all(not frozen for frozen in seen_perturbed), "a frozen weight was perturbed during a forward pass"
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"adapter {n} was not updated"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
