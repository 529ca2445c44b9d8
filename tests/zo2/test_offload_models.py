"""zo2.offload against plain ZOSGD on the Hugging Face models whose forward reads resident parameters
outside their modules (ProphetNet's ``ngram_embeddings.weight``, Reformer's axial position
``ParameterList``) or never calls some of them (Gemma 3's vision tower on text input).

Tiny sizes, random init, float64, eval mode. The two runs differ only by the fp32 accumulation of the
fused noise pass (see test_offload_residents.py): per element and step < 2^-24·(ε + lr·|g|)·|z|max
≈ 6e-8·(1e-3 + 1e-3·5)·6 < 4e-9, so after 2 steps the parameters agree to 1e-8 and g to 1e-6 relative
(|∂g/∂θ|₁·4e-9 with |∂g/∂θ|₁ < 100·|g|). Before every resident tensor was moved on each turn of a
half, g was off by 5e-2 to 5e-1 relative and parameters by 1e-3 (1e-2 in Gemma 3's idle tower).
"""

import copy

import pytest
import torch
import transformers

import zo2
from memtrain.testing import assert_close_verbose

P_TOL = 1e-8
G_REL = 1e-6


def prophetnet():
    return transformers.ProphetNetForCausalLM(transformers.ProphetNetConfig(
        vocab_size=50, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=2, num_decoder_attention_heads=2, ngram=2, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64))


def reformer():
    return transformers.ReformerModelWithLMHead(transformers.ReformerConfig(
        vocab_size=50, hidden_size=16, attention_head_size=8, num_attention_heads=2, feed_forward_size=32,
        axial_pos_shape=[4, 4], axial_pos_embds_dim=[8, 8], attn_layers=["local", "local"],
        local_attn_chunk_length=4, max_position_embeddings=16, is_decoder=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0))


def gemma3():
    return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         sliding_window=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62))


@pytest.mark.parametrize("build", [prophetnet, reformer, gemma3], ids=lambda f: f.__name__)
def test_offload_matches_plain_zosgd(build):
    torch.manual_seed(0)
    plain = build().double().eval()
    offloaded = copy.deepcopy(plain)
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    kwargs = dict(lr=1e-3, eps=1e-3, seed=4)
    opt_plain = zo2.ZOSGD(plain.parameters(), **kwargs)
    opt_off = zo2.ZOSGD(offloaded.parameters(), **kwargs)
    zo2.offload(offloaded, opt_off, device="cpu", verbose=False)
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt_plain.step(lambda: plain(input_ids=ids, labels=ids).loss)
        opt_off.step(lambda: offloaded(input_ids=ids, labels=ids).loss)
        assert opt_off.projected_grad == pytest.approx(opt_plain.projected_grad, rel=G_REL)
    opt_off.flush()
    for (name, p), q in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        assert_close_verbose(p, q, atol=P_TOL, rtol=0, name=name)
        assert not torch.equal(p, before[name]), f"{name} was never updated"
