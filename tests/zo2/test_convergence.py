"""ZOSGD really optimises: after a short first-order warm-up, zeroth-order steps lower the held-out loss."""

import torch
from transformers import OPTConfig, OPTForCausalLM

import zo2

VOCAB = 32


def arithmetic_sequences(n: int, seed: int, stride: int = 3, length: int = 16) -> torch.Tensor:
    """Token sequences start, start+stride, ... (mod VOCAB): a rule a small LM can learn."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + stride * torch.arange(length)) % VOCAB


def test_zo_steps_lower_held_out_loss():
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(config)
    train, held = arithmetic_sequences(256, seed=0), arithmetic_sequences(128, seed=1)
    rng = torch.Generator().manual_seed(0)

    def loss_on(ids):
        return model(input_ids=ids, labels=ids).loss

    adam = torch.optim.AdamW(model.parameters(), lr=3e-3)  # a little first-order training first
    for _ in range(40):
        loss_on(train[torch.randint(0, 256, (32,), generator=rng)]).backward()
        adam.step()
        adam.zero_grad()
    model.eval()
    with torch.no_grad():
        before = loss_on(held).item()

    opt = zo2.ZOSGD(model.parameters(), lr=2e-3, eps=1e-3, seed=0, num_perturbations=4)
    for _ in range(200):
        batch = train[torch.randint(0, 256, (32,), generator=rng)]
        opt.step(lambda batch=batch: loss_on(batch))
    with torch.no_grad():
        after = loss_on(held).item()
    # measured: 0.703 -> 0.624 (-11%); a broken estimator or update leaves it flat or sends it up
    assert after < 0.93 * before, f"held-out loss {before:.4f} -> {after:.4f}"
