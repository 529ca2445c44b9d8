"""Finding the block list: hybrid models whose known block list mixes layer classes (Jamba, OLMo-hybrid),
and the refusal of a forward that reuses its blocks (HRM, Dory) saying so."""

import copy

import pytest
import torch
import transformers
from torch import nn

import zo2
from zo2.blocks import find_blocks
from zo2.halves import ClosureProtocolError


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.q(h))


class Mixer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * torch.sin(self.conv(h))


class Inner(nn.Module):
    def __init__(self, layers: list[nn.Module], loops: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.loops = loops
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for _ in range(self.loops):
            for layer in self.layers:
                h = layer(h)
        return self.norm(h)


class Hybrid(nn.Module):
    """``model.layers`` interleaves two layer classes; ``loops`` > 1 runs the list repeatedly (HRM-style)."""

    def __init__(self, loops: int = 1) -> None:
        super().__init__()
        self.model = Inner([Attn(6), Mixer(6), Attn(6), Mixer(6)], loops)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.model(ids) ** 2).mean()


def test_a_known_block_list_may_mix_layer_classes():
    model = Hybrid()
    path, blocks = find_blocks(model)
    assert path == "model.layers" and blocks == list(model.model.layers)


def test_a_mixed_list_at_an_unknown_path_is_not_guessed():
    """The fallback search keeps its one-class rule: a mixed list elsewhere is not taken for the blocks."""
    model = nn.Module()
    model.stack = nn.ModuleList([Attn(6), Mixer(6)])
    with pytest.raises(ValueError, match="found no list of transformer blocks"):
        find_blocks(model)


def test_a_hybrid_offloads_and_follows_plain_zosgd():
    """float64; the runs differ by the fp32 rounding of the fused noise passes (< 1e-8 in θ per step
    here, test_offload_residents.py), far below the 1e-6 relative asserted on g."""
    torch.manual_seed(0)
    plain = Hybrid().double().eval()
    offloaded = copy.deepcopy(plain)
    opt_plain = zo2.ZOSGD(plain.parameters(), lr=1e-2, seed=2)
    opt_off = zo2.ZOSGD(offloaded.parameters(), lr=1e-2, seed=2)
    engine = zo2.offload(offloaded, opt_off, device="cpu", verbose=False)
    assert engine.block_path == "model.layers"
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt_plain.step(lambda: plain(ids))
        opt_off.step(lambda: offloaded(ids))
        assert opt_off.projected_grad == pytest.approx(opt_plain.projected_grad, rel=1e-6)


def test_olmo_hybrid_finds_its_mixed_layers_without_blocks():
    config = transformers.AutoConfig.for_model(
        "olmo_hybrid", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 4 and len({type(b) for b in blocks}) == 2


def test_a_forward_that_reuses_its_blocks_is_refused_as_such():
    model = Hybrid(loops=2).eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=2)
    engine = zo2.offload(model, opt, device="cpu", verbose=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 11, (2, 5))
    with pytest.raises(ClosureProtocolError, match=r"ran block 0 again after block 3 within one call: it reuses"):
        opt.step(lambda: model(ids))
    assert not engine.in_step
    opt.flush()
    for name, p in model.named_parameters():  # restored: +εz and -εz, two fp32 roundings of |θ| < 2
        torch.testing.assert_close(p, before[name], rtol=0, atol=2 * 2**-23, msg=name)


def test_calling_the_model_twice_still_says_so():
    model = Hybrid().eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=2)
    zo2.offload(model, opt, device="cpu", verbose=False)
    ids = torch.randint(0, 11, (2, 5))
    with pytest.raises(ClosureProtocolError, match="ran the model a second time"):
        opt.step(lambda: model(ids) + model(ids))


def test_hrm_is_refused_as_a_model_that_reuses_its_blocks():
    config = transformers.AutoConfig.for_model(
        "hrm_text", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=1)
    zo2.offload(model, opt, device="cpu", verbose=False)
    ids = torch.randint(3, 60, (2, 8))
    with pytest.raises(ClosureProtocolError, match="reuses its blocks"):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
