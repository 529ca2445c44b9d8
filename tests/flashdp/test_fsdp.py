"""flashdp under FSDP2 (fully_shard) on gloo: 2 and 4 CPU ranks against one process with the whole batch.

One script, ``CASES``, builds the tiny models and runs the training schedule; the ranks run it under
fully_shard, and the test runs it in-process (no torch.distributed) for the single-process reference. The
schedule covers both orders of make_private and fully_shard, a step whose gradients are not finite on one
rank only, gradient accumulation, a torch.distributed.checkpoint save and resume, and the accountant.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import flashdp
from flashdp.errors import FlashDPError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

CASES = r'''
import torch
import torch.distributed as dist
import transformers
from torch import nn

import flashdp

V, T, B, SIGMA, Q = 37, 7, 8, 1.0, 0.1


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager"))


class OPTWithHead(nn.Module):
    """Tiny OPT (embedding tied to the LM head; vocabulary 37 and ffn 22 rows: uneven shards) plus a 5-row
    head (an empty shard on the 4th of 4 ranks)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lm = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=22, num_attention_heads=2,
            max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, attn_implementation="eager"))
        self.a, self.b = nn.Linear(V, 5), nn.Linear(5, 3)

    def forward(self, input_ids, labels):
        out = self.lm(input_ids=input_ids, labels=labels)
        return out.loss + self.b(self.a(out.logits)).pow(2).mean()


class History:
    """An accountant that records what it is told (flashdp.PrivacyAccountant's interface, without Opacus's import
    in every rank): ε is a function of this history, so equal histories mean unchanged accounting."""

    def __init__(self):
        self.history = []

    def step(self, *, noise_multiplier, sample_rate):
        self.history.append((noise_multiplier, sample_rate))

    def state_dict(self):
        return {"history": list(self.history)}

    def load_state_dict(self, sd):
        self.history = list(sd["history"])


def blocks(model):
    return model.model.layers if hasattr(model, "model") else model.lm.model.decoder.layers


def loss_of(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out if torch.is_tensor(out) else out.loss


def batch(step):
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(100 + step))


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def build(kind, order, mesh):
    """A private model and its DPOptimizer; fully_shard (blocks, then the root) when ``mesh`` is given."""
    from torch.distributed.fsdp import fully_shard
    model = tiny_llama() if kind == "llama" else OPTWithHead()
    if order == "before":
        flashdp.make_private(model, 1.0)
    if mesh is not None:
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if order == "after":
        flashdp.make_private(model, 1.0)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = flashdp.DPOptimizer(inner, noise_multiplier=SIGMA, expected_batch_size=B, seed=11,
                              accountant=History(), sample_rate=Q)
    return model, opt


def train(model, opt, rank, world, steps, poison=False, save=None):
    """Logical steps ``steps`` (step 1: two micro-batches per rank); each rank takes its rows of the batch."""
    rec = {}
    for step in steps:
        ids = batch(step)
        mine = ids[rank * B // world:(rank + 1) * B // world]
        if poison and step == steps[0]:  # a non-finite gradient in rank 0's shard only: every rank must skip
            loss_of(model, mine).backward()
            if rank == 0:
                next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
            before = {n: full(p) for n, p in model.named_parameters()}
            rec["skip_returned"] = opt.step()
            rec["skip_unchanged"] = all(torch.equal(full(p), before[n]) for n, p in model.named_parameters())
            opt.zero_grad()
        parts = [mine[:1], mine[1:]] if step == 1 else [mine]
        for part in parts:
            loss_of(model, part).backward()
        if step == 0:
            rec["clipped_sums"] = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    rec["params"] = {n: full(p) for n, p in model.named_parameters()}
    rec["steps"], rec["skipped"] = opt.steps, opt.skipped_steps
    rec["accounted"] = list(opt.accountant.history)
    return rec
'''

WORKER = CASES + r'''
import os
import sys

import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh


def rank_main(rank, world, port, out, kinds):
    torch.set_num_threads(1)  # the ranks share the machine's cores: more threads would spin against each other
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind in kinds:
        if kind == "llama":  # make_private after fully_shard, a DCP checkpoint after step 0 and a resumed run
            model, opt = build("llama", "after", mesh)
            results["llama_sharded"] = flashdp.privacy_state(model).runtime.sharded
            results["llama_after"] = train(model, opt, rank, world, [0], poison=True)
            dcp.save({"run": flashdp.CheckpointState(model, opt)}, checkpoint_id=f"{out}.ckpt")
            results["llama_after"].update(train(model, opt, rank, world, [1, 2]))
            model, opt = build("llama", "after", mesh)
            dcp.load({"run": flashdp.CheckpointState(model, opt)}, checkpoint_id=f"{out}.ckpt")
            results["llama_resumed"] = train(model, opt, rank, world, [1, 2])
            model, opt = build("llama", "before", mesh)
            results["llama_before"] = train(model, opt, rank, world, [0, 1, 2])
        elif kind == "hsdp":  # 2 replicas × 2 shards: reduce-scatter within a replica, all-reduce across them
            hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            model, opt = build("opt", "after", hsdp)
            results["opt_hsdp"] = train(model, opt, rank, world, [0, 1, 2])
        else:
            model, opt = build("opt", kind, mesh)
            results[f"opt_{kind}"] = train(model, opt, rank, world, [0, 1, 2])
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank tears down its pairs (rank 0: the TCPStore) while another still runs a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    # argv: rank world port (from spawn_ranks: one fresh interpreter per rank, nothing forked) out kinds
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(","))
'''


def _run_ranks(spawn_ranks, world: int, out: str, kinds: str) -> dict:
    spawn_ranks(WORKER, world, out, kinds)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single_process():
    """The single-process run with the whole batch (the reference), per model."""
    ns: dict = {}
    exec(CASES, ns)
    out = {}
    for kind in ("llama", "opt"):
        model, opt = ns["build"](kind, "before", None)
        out[kind] = ns["train"](model, opt, 0, 1, [0, 1, 2])
    return out


def _max_rel(got: dict, want: dict, groups: list[list[str]]) -> float:
    """max over clip groups of max|got − want| / max|want| within the group (rounding is relative to a group's
    scale: a parameter whose sum cancels to ~0, like a key bias, carries its group's absolute rounding)."""
    worst = 0.0
    for names in groups:
        err = max((got[n].double() - want[n].double()).abs().max().item() for n in names)
        scale = max(want[n].double().abs().max().item() for n in names)
        worst = max(worst, err / scale)
    return worst


def _groups(kind: str) -> list[list[str]]:
    ns: dict = {}
    exec(CASES, ns)
    model = ns["tiny_llama"]() if kind == "llama" else ns["OPTWithHead"]()
    flashdp.make_private(model, 1.0)
    return [g.param_names for g in flashdp.privacy_state(model).groups]


# Tolerance: fp32 sums of the same clipped per-sample terms in another order (each rank sums its samples, the
# reduce-scatter adds the ranks' sums): a few ulps (2^-24 ≈ 6e-8) of the group's scale per addition over
# B = 8 samples: ≤ 8 · 2 · 6e-8 ≈ 1e-6. The noise is the same bits in both runs (Philox by global index).
TOL = 1e-6


def _check_against_single(rec: dict, ref: dict, groups: list[list[str]], label: str, figures: dict) -> None:
    figures[f"{label} clipped sums"] = _max_rel(rec["clipped_sums"], ref["clipped_sums"], groups)
    figures[f"{label} params after 3 noisy steps"] = _max_rel(rec["params"], ref["params"], groups)
    assert figures[f"{label} clipped sums"] <= TOL, figures
    assert figures[f"{label} params after 3 noisy steps"] <= TOL, figures
    assert rec["steps"] == ref["steps"] == 3
    assert rec["accounted"] == ref["accounted"] == [(1.0, 0.1)] * 3  # accounting unchanged: 3 steps at (σ, q)


def test_two_ranks_llama_and_opt_match_one_process(tmp_path, spawn_ranks, single_process, capsys):
    """2 ranks: make_private after or before fully_shard, same update as one process with the whole batch;
    a NaN in one rank's shard skips the step on every rank; a DCP checkpoint resumes exactly."""
    res = _run_ranks(spawn_ranks, 2, str(tmp_path / "two"), "llama,before")
    assert res["llama_sharded"]
    figures: dict = {}
    llama_groups = _groups("llama")
    _check_against_single(res["llama_after"], single_process["llama"], llama_groups, "2 ranks llama", figures)
    _check_against_single(res["opt_before"], single_process["opt"], _groups("opt"), "2 ranks opt", figures)
    after, before, resumed = res["llama_after"], res["llama_before"], res["llama_resumed"]
    for n in after["params"]:  # either order: the same computation, bit for bit
        assert torch.equal(after["params"][n], before["params"][n]), n
        assert torch.equal(after["clipped_sums"][n], before["clipped_sums"][n]), n
        assert torch.equal(resumed["params"][n], after["params"][n]), n  # DCP resume: bit for bit
    assert after["skip_returned"] is None and after["skip_unchanged"] and after["skipped"] == 1
    assert resumed["skipped"] == 1 and resumed["steps"] == 3 and resumed["accounted"] == after["accounted"]
    with capsys.disabled():
        print("\nflashdp FSDP2 max relative differences vs one process:",
              {k: f"{v:.2e}" for k, v in figures.items()})


def test_four_ranks_uneven_and_empty_shards_tied_opt(tmp_path, spawn_ranks, single_process, capsys):
    """4 ranks: 37- and 22-row parameters (uneven shards), a 5-row one (an empty shard), OPT's tied
    embedding/LM head; make_private after fully_shard; FSDP over 4 ranks and HSDP over 2 replicas of 2 shards
    (its all-reduce across replicas must sum too); equal to one process with the whole batch."""
    res = _run_ranks(spawn_ranks, 4, str(tmp_path / "four"), "after,hsdp")
    figures: dict = {}
    _check_against_single(res["opt_after"], single_process["opt"], _groups("opt"), "4 ranks opt", figures)
    _check_against_single(res["opt_hsdp"], single_process["opt"], _groups("opt"), "4 ranks opt hsdp 2x2", figures)
    with capsys.disabled():
        print("\nflashdp FSDP2 max relative differences vs one process:",
              {k: f"{v:.2e}" for k, v in figures.items()})


# --- one process, a world of 1: FSDP2's wrapping and flashdp's refusals, without spawning ranks ---------------

@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=37, hidden_size=16, num_hidden_layers=1, ffn_dim=22, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16, attn_implementation="eager"))


def test_tied_group_split_across_units_is_refused(world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = _tiny_opt()
    flashdp.make_private(model, 1.0)
    fully_shard(model.model.decoder)  # the embedding in one unit, the LM head tied to it in the root's
    fully_shard(model)
    with pytest.raises(FlashDPError, match=r"embed_tokens\+lm_head.*across FSDP2 units.*then the root"):
        flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=2)


def test_use_left_waiting_at_the_end_of_backward_is_refused_under_fsdp(world_of_one):
    """FSDP2 has reduced the gradients when the pass ends: a clip group still waiting then is an error."""
    from torch.distributed.fsdp import fully_shard

    model = _tiny_opt()
    for block in model.model.decoder.layers:
        fully_shard(block)
    fully_shard(model)
    flashdp.make_private(model, 1.0)
    ids = torch.randint(2, 37, (2, 5))
    kept = model(input_ids=ids, labels=ids)  # a forward whose graph stays alive, never backpropagated
    with pytest.raises(FlashDPError, match=r"still waiting.*FSDP2.*torch.no_grad"):
        model(input_ids=ids, labels=ids).loss.backward()
    del kept


def test_fully_sharded_leaf_keeps_fsdp_and_dp_classes(world_of_one):
    """make_private after fully_shard on a Linear itself: the DP class is combined with FSDP2's class."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    fully_shard(model[0])
    fully_shard(model)
    flashdp.make_private(model, 1.0)
    assert isinstance(model[0], FSDPModule) and isinstance(model[0], flashdp.DPLinear)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    assert opt.steps == 1



def test_shard_offsets_and_refused_placements(world_of_one):
    """A plain tensor is its own shard at offset 0; dim-0 DTensors give their offset; any other dim is refused
    (its shard is not one row-major range of the noise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flashdp.fsdp import local_shard

    t = torch.arange(12.0).reshape(4, 3)
    assert local_shard(t) == (t, 0)
    mesh = init_device_mesh("cpu", (1,))
    local, offset = local_shard(distribute_tensor(t, mesh, [Shard(0)]))
    assert torch.equal(local, t) and offset == 0
    with pytest.raises(FlashDPError, match=r"Shard\(dim=1\).*dim 0 only"):
        local_shard(distribute_tensor(t, mesh, [Shard(1)]))


def test_optimizer_built_before_fully_shard_is_refused(world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    flashdp.make_private(model, 1.0)
    opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              expected_batch_size=4)
    fully_shard(model)  # replaces every parameter: the optimizer holds the old ones
    model(torch.randn(4, 4)).sum().backward()
    with pytest.raises(flashdp.ModelChangedError, match="build the optimizer after fully_shard"):
        opt.step()
