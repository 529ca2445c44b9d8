"""Whole tiny Hugging Face models (Llama with RMSNorm, GPT-2 with Conv1D and tied head, OPT) against the
float64 per-sample loop; bf16 against the fp32/fp64 reference; Opacus per-sample gradients."""

import copy

import pytest
import torch
from torch import nn

import flashdp

transformers = pytest.importorskip("transformers")

V, T, B = 37, 7, 4


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def _opt():
    cfg = transformers.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                                 max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
                                 attention_dropout=0.0, activation_dropout=0.0, attn_implementation="eager")
    return transformers.OPTForCausalLM(cfg)


def _hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("build", [_llama, _gpt2, _opt], ids=["llama", "gpt2", "opt"])
def test_tiny_model_matches_per_sample_loop(ref, build):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(2, V, (B, T))
    keys = list(model.state_dict().keys())
    want, norms, groups = ref.per_sample_clipped_sum(model, lambda m, b: _hf_loss(m, ids[b:b + 1]), B, 1.0)
    flashdp.make_private(model, 1.0)
    assert list(model.state_dict().keys()) == keys
    state = flashdp.privacy_state(model)
    assert len(state.groups) == len(groups)
    _hf_loss(model, ids).backward()
    ref.assert_grads_close(model, want, rtol=2e-4, atol=1e-6)
    flat = sorted(n for row in norms for n in row)
    c_l = 1.0 / len(groups) ** 0.5
    assert flat[0] < c_l < flat[-1], "test should mix clipped and unclipped groups"


def test_gpt2_tied_head_is_one_group():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    flashdp.make_private(model, 1.0)
    state = flashdp.privacy_state(model)
    tied = [g for g in state.groups if any(p is model.lm_head.weight for p in g.params)]
    assert len(tied) == 1 and "lm_head" in tied[0].name and "wte" in tied[0].name
    assert model.lm_head.weight is model.transformer.wte.weight  # not untied


def test_bf16_against_fp64_reference(ref):
    torch.manual_seed(0)
    model = _llama().to(torch.bfloat16)
    ids = torch.randint(2, V, (B, T))
    loss = lambda m, b: _hf_loss(m, ids[b:b + 1])  # noqa: E731
    want64, _, _ = ref.per_sample_clipped_sum(model, loss, B, 1.0, dtype=torch.float64)
    torch_bf16, _, _ = ref.per_sample_clipped_sum(model, loss, B, 1.0, dtype=torch.bfloat16)
    flashdp.make_private(model, 1.0)
    _hf_loss(model, ids).backward()
    for n, p in model.named_parameters():
        e = want64[n]
        err_dp = (p.grad.double() - e).abs().max().item()
        err_torch = (torch_bf16[n].double() - e).abs().max().item()
        assert err_dp <= 2 * err_torch + 2e-2 * e.abs().max().item() + 1e-6, (n, err_dp, err_torch)


def test_agrees_with_opacus_per_sample_gradients():
    from opacus import GradSampleModule

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(13, 8)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 5)

        def forward(self, ids):
            return self.fc(torch.tanh(self.ln(self.emb(ids)))).mean(1)

    net = Net()
    ids = torch.randint(0, 13, (6, 4))
    y = torch.randint(0, 5, (6,))
    gsm = GradSampleModule(copy.deepcopy(net), loss_reduction="mean")
    nn.functional.cross_entropy(gsm(ids), y).backward()
    groups = [["emb.weight"], ["ln.weight", "ln.bias"], ["fc.weight", "fc.bias"]]
    gs = {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}
    c_l = 0.5 / 3**0.5
    want = {}
    for g in groups:
        norms = torch.stack([gs[n].flatten(1).norm(dim=1) for n in g]).norm(dim=0)
        coef = (c_l / (norms + 1e-6)).clamp(max=1)
        for n in g:
            want[n] = torch.einsum("b,b...->...", coef, gs[n])
    flashdp.make_private(net, 0.5)
    nn.functional.cross_entropy(net(ids), y).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6)
