"""zo2 over FSDP2 (``fully_shard``) on gloo: the trajectory of one process, bit for bit.

Each rank runs its rows of the batch; the single-process reference (plain ZOSGD on the unsharded model,
run in rank 0's process after the sharded run) computes the same per-rank losses and averages them.
Why bit for bit: the all-gathered weight holds the chunks exactly, every element's pass is a function
of (seed, stream, global index) alone, the per-rank forwards see the same weights and rows, and the
losses are fp32 values whose sum over 2 or 3 ranks is exact in float64 (24-bit significands), so the
all-reduce's summation order cannot change the mean. Any wrong offset, stream id, stale unsharded copy
or missed pass shows as a difference.
"""

import pathlib

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

TESTS_DIR = str(pathlib.Path(__file__).parent)

COMMON = """
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
import zo2

rank, world, port, out, tests_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
sys.path.insert(0, tests_dir)
from conftest import tiny_llama, tiny_opt

BLOCKS = {"opt": lambda m: m.model.decoder.layers, "llama": lambda m: m.model.layers}
BUILD = {"opt": tiny_opt, "llama": tiny_llama}
g = torch.Generator().manual_seed(1)
BATCHES = [torch.randint(0, 61, (2 * world, 9), generator=g) for _ in range(3)]


def rows(ids, r):
    return ids[2 * r:2 * r + 2]


def sharded(name, **kw):
    model = BUILD[name]()
    names = [n for n, _ in model.named_parameters()]
    for block in BLOCKS[name](model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    # the stream ids are positions in this order: fully_shard must keep it (and the tie)
    assert [n for n, _ in model.named_parameters()] == names
    return model


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def make_opt(model, q, seed=7):
    return zo2.ZOSGD(model.parameters(), lr=2e-3, eps=1e-3, weight_decay=0.01, seed=seed, num_perturbations=q)
"""

TRAJECTORIES = COMMON + """
# name: (model, q, fully_shard options, raise inside block 1's forward in half 1 of step 1)
CONFIGS = {
    "opt-q1": ("opt", 1, {}, False),
    "opt-q2-error": ("opt", 2, {}, True),
    "llama-q1-keep-unsharded": ("llama", 1, {"reshard_after_forward": False}, False),
    "llama-q2-cpu-offload": ("llama", 2, {"offload_policy": CPUOffloadPolicy(pin_memory=False)}, False),
    # HSDP: replicated over the 2 ranks, sharded over 1; the losses must still be averaged over both
    "opt-q1-hsdp": ("opt", 1, {"mesh": init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))},
                    False),
}


def train(model, opt, closure_of, fail):
    calls = {"n": 0, "boom": False}
    block = BLOCKS[name](model)[1]

    def boom(module, args):
        if calls["boom"]:
            calls["boom"] = False
            raise RuntimeError("planted failure")

    block.register_forward_pre_hook(boom)
    losses, errors, all_reduces = [], [], []
    for t, ids in enumerate(BATCHES):
        inner = closure_of(ids)

        def closure():
            calls["n"] += 1
            calls["boom"] = fail and t == 1 and calls["n"] == 2
            return inner()

        calls["n"] = 0
        counted, real = [0], dist.all_reduce

        def counting(*a, **k):
            counted[0] += 1
            return real(*a, **k)

        dist.all_reduce = counting
        try:
            losses.append(opt.step(closure).item())
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            dist.all_reduce = real
        all_reduces.append(counted[0])
    return losses, errors, all_reduces


results = {}
for cname, (name, q, kw, fail) in CONFIGS.items():
    model = sharded(name, **kw)
    opt = make_opt(model, q)
    zo2.attach_fsdp(model, opt)
    losses, errors, all_reduces = train(
        model, opt, lambda ids, model=model: (lambda: model(input_ids=rows(ids, rank), labels=rows(ids, rank)).loss),
        fail)
    results[cname] = {"losses": losses, "errors": errors, "all_reduces": all_reduces, "params": full_params(model),
                      "steps": opt.step_count}
    if rank == 0:  # one process, unsharded: the mean of the same per-rank losses
        ref = BUILD[name]()
        ref_opt = make_opt(ref, q)

        def ref_closure_of(ids, ref=ref):
            return lambda: sum(float(ref(input_ids=rows(ids, r), labels=rows(ids, r)).loss)
                               for r in range(world)) / world

        losses, errors, _ = train(ref, ref_opt, ref_closure_of, fail)
        whole = BUILD[name]()
        whole_opt = make_opt(whole, q)
        whole_losses, _, _ = train(whole, whole_opt, lambda ids, m=whole: (lambda: m(input_ids=ids, labels=ids).loss),
                                   fail)
        results[cname]["reference"] = {"losses": losses, "errors": errors, "params": full_params(ref),
                                       "steps": ref_opt.step_count}
        results[cname]["whole_batch"] = {"losses": whole_losses, "params": full_params(whole)}
"""

RESUME = """
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import Shard

ckpt = out + ".ckpt"


def closure_of(model, ids):
    return lambda: model(input_ids=rows(ids, rank), labels=rows(ids, rank)).loss


model = sharded("opt")
opt = make_opt(model, 2)
zo2.attach_fsdp(model, opt)
losses = [opt.step(closure_of(model, BATCHES[0])).item()]
dcp.save({"model": get_model_state_dict(model), "zo2": opt.state_dict()}, checkpoint_id=ckpt)
losses += [opt.step(closure_of(model, ids)).item() for ids in BATCHES[1:]]
uninterrupted = {"losses": losses[1:], "params": full_params(model)}

# a fresh run: other initial weights, other seed; ZOSGD built before the model state is loaded
model = sharded("opt")
for p in model.parameters():
    p.to_local().detach().normal_()
opt = make_opt(model, 2, seed=12345)
zo2.attach_fsdp(model, opt)
state = {"model": get_model_state_dict(model), "zo2": opt.state_dict()}
dcp.load(state, checkpoint_id=ckpt)
set_model_state_dict(model, state["model"])
opt.load_state_dict(state["zo2"])
resumed = {"losses": [opt.step(closure_of(model, ids)).item() for ids in BATCHES[1:]], "params": full_params(model)}

errors = {}


def refused(key, fn):
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as e:
        errors[key] = str(e)


plain = BUILD["opt"]()
early = make_opt(plain, 1)
for block in BLOCKS["opt"](plain):
    fully_shard(block)
fully_shard(plain)
refused("built_before_fully_shard", lambda: zo2.attach_fsdp(plain, early))
late = make_opt(plain, 1)
refused("not_attached", lambda: late.step(closure_of(plain, BATCHES[0])))
refused("offload", lambda: zo2.offload(plain, late, device="cpu", verbose=False))
one, _ = dist.new_subgroups(group_size=1)
late.process_group = one
refused("group_size", lambda: zo2.attach_fsdp(plain, late))
late.process_group = None
zo2.attach_fsdp(plain, late)
refused("attached_twice", lambda: zo2.attach_fsdp(plain, late))
with torch.no_grad():
    plain(input_ids=rows(BATCHES[0], rank))  # leaves the root's parameters unsharded (plain tensors)
after_forward = make_opt(plain, 1)
refused("built_after_forward", lambda: zo2.attach_fsdp(plain, after_forward))
dim1 = BUILD["opt"]()
fully_shard(dim1, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
refused("dim1", lambda: make_opt(dim1, 1))
refused("unsharded_model", lambda: zo2.attach_fsdp(BUILD["opt"](), make_opt(BUILD["opt"](), 1)))
torch.save({"trajectories": results, "uninterrupted": uninterrupted, "resumed": resumed, "errors": errors},
           f"{out}.{rank}")
dist.destroy_process_group()
"""

WORKER = TRAJECTORIES + RESUME


def test_two_ranks_equal_one_process_resume_and_refusals(tmp_path, spawn_ranks):
    """One launch of 2 gloo ranks (the imports dominate its time) for three checks below."""
    out = str(tmp_path / "fsdp")
    spawn_ranks(WORKER, 2, out, TESTS_DIR)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    check_trajectories_equal_one_process_bit_for_bit(ranks)
    for res in ranks:
        check_resume_with_distributed_checkpoint(res)
        check_refusals(res["errors"])


def check_resume_with_distributed_checkpoint(res):
    """A run saved with torch.distributed.checkpoint after step 1 and resumed into a fresh sharded model
    and optimizer (other weights, other seed) continues bit for bit."""
    assert res["resumed"]["losses"] == res["uninterrupted"]["losses"]
    for n, want in res["uninterrupted"]["params"].items():
        assert torch.equal(res["resumed"]["params"][n], want), n


def check_refusals(errors):
    """Misuse is refused with the fix."""
    assert "build ZOSGD(model.parameters(), ...) after fully_shard" in errors["built_before_fully_shard"]
    assert "zo2.attach_fsdp(model, opt)" in errors["not_attached"]
    assert "do not combine" in errors["offload"] and "CPUOffloadPolicy" in errors["offload"]
    assert "1 ranks but the model is sharded over 2" in errors["group_size"]
    assert "already attached" in errors["attached_twice"]
    assert "after a forward" in errors["built_after_forward"]
    assert "Shard(0)" in errors["dim1"]
    assert "no fully_shard module" in errors["unsharded_model"]


def check_trajectories_equal_one_process_bit_for_bit(ranks):
    """Tiny OPT (tied embedding and head; vocab 61 splits 31/30) and Llama, q = 1 and 2, 3 steps each:
    default FSDP2 (the root keeps its parameters unsharded after a forward), an error inside a block's
    forward in the middle of a step, reshard_after_forward=False, and CPUOffloadPolicy."""
    ranks = [r["trajectories"] for r in ranks]
    mismatches = []
    for cname, res in ranks[0].items():
        ref = res["reference"]
        assert ref["errors"] == res["errors"], cname
        assert res["steps"] == ref["steps"] == 3 - len(ref["errors"]), cname
        if "error" in cname:
            assert len(res["errors"]) == 1 and "planted failure" in res["errors"][0], res["errors"]
        for r in ranks:
            if r[cname]["losses"] != ref["losses"]:
                mismatches.append(f"{cname}: losses {r[cname]['losses']} != {ref['losses']}")
            # one all-reduce per step (the 2q losses together; none in the step that raised); the first step
            # also checks once that the ranks share seed and step (two more)
            per_step = [0, 1] if "error" in cname else [1, 1]
            assert r[cname]["all_reduces"] == [3, *per_step], (cname, r[cname]["all_reduces"])
            for n, want in ref["params"].items():
                got = r[cname]["params"][n]
                if not torch.equal(got, want):
                    mismatches.append(f"{cname}: {n} differs by {(got - want).abs().max().item():.3g}")
        # for the record (pytest -s): one process with the whole batch, whose mean loss rounds differently
        whole = res["whole_batch"]
        d = max((ranks[0][cname]["params"][n] - w).abs().max().item() for n, w in whole["params"].items())
        rel = max(abs(a - b) / abs(b) for a, b in zip(ranks[0][cname]["losses"], whole["losses"], strict=False))
        print(f"{cname}: vs the whole batch in one process, max |Δθ| = {d:.3g}, max loss rel. diff = {rel:.3g}")
    assert not mismatches, "\n".join(mismatches)


UNEVEN = """
import math, os, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
import zo2
from zo2.sharding import local_shard
from memtrain.testing import philox_noise_numpy

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)


def build():
    torch.manual_seed(0)  # weights (2, 4) and (5, 2), biases (2,) and (5,): chunks 1/1/0 and 2/2/1 on 3 ranks
    return nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 5))


g = torch.Generator().manual_seed(3)
xs, ys = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 5, generator=g)  # per step: one row per rank + 1
model = build()
fully_shard(model[0])
fully_shard(model[2])
fully_shard(model)
layout = {}
torch.set_grad_enabled(False)
for stream, (n, p) in enumerate(model.named_parameters()):
    local, offset = local_shard(p)
    # independent: torch.chunk of the row indices, as FSDP2 documents its dim-0 sharding
    chunks = list(torch.arange(p.shape[0]).chunk(world)) + [torch.arange(0)] * world
    rows_before = sum(len(c) for c in chunks[:rank])
    before = local.detach().clone()
    zo2.noise.apply_pass(local, stream, [99], [0.5], 0.0, "normal", offset)
    z = philox_noise_numpy(99, stream, p.numel(), 0, "normal").reshape(p.shape)
    z = z[rows_before:rows_before + len(chunks[rank])]
    layout[n] = {"numel": local.numel(), "offset": offset, "expected": rows_before * math.prod(p.shape[1:]),
                 "noise_err": (local.double() - before.double() - 0.5 * torch.from_numpy(z).double()).abs().max().item()
                 if local.numel() else 0.0}
    zo2.noise.apply_pass(local, stream, [99], [-0.5], 0.0, "normal", offset)
    local.copy_(before)
torch.set_grad_enabled(True)

model = build()
fully_shard(model[0])
fully_shard(model[2])
fully_shard(model)
opt = zo2.ZOSGD(model.parameters(), lr=0.05, eps=1e-3, seed=5, num_perturbations=2)
zo2.attach_fsdp(model, opt)
loss_fn = nn.functional.mse_loss
losses = [opt.step(lambda t=t: loss_fn(model(xs[t, rank:rank + 1]), ys[t, rank:rank + 1])).item() for t in range(3)]
params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
res = {"layout": layout, "losses": losses, "params": params}
if rank == 0:
    ref = build()
    ref_opt = zo2.ZOSGD(ref.parameters(), lr=0.05, eps=1e-3, seed=5, num_perturbations=2)
    res["ref_losses"] = [ref_opt.step(lambda t=t: sum(float(loss_fn(ref(xs[t, r:r + 1]), ys[t, r:r + 1]))
                                                     for r in range(world)) / world).item() for t in range(3)]
    res["ref_params"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
torch.save(res, f"{out}.{rank}")
dist.destroy_process_group()
"""


def test_uneven_and_empty_shards_on_three_ranks(tmp_path, spawn_ranks):
    """Dim-0 sizes 2 and 5 on 3 ranks: shards of 1/1/0 and 2/2/1 rows. Each shard's offset is that of
    torch.chunk, its noise the matching slice of the unsharded parameter's stream (the NumPy Philox
    reference), and the trajectory is one process's, bit for bit."""
    out = str(tmp_path / "uneven")
    spawn_ranks(UNEVEN, 3, out, TESTS_DIR)
    ranks = [torch.load(f"{out}.{r}") for r in range(3)]
    assert ranks[2]["layout"]["0.weight"]["numel"] == 0 and ranks[2]["layout"]["2.weight"]["numel"] == 2
    for rank, r in enumerate(ranks):
        for n, lay in r["layout"].items():
            assert lay["offset"] == lay["expected"] or lay["numel"] == 0, (rank, n, lay)
            # z in fp32 against the float64 reference (<= 2e-6, tests/kernels/test_philox.py), halved, plus
            # one rounding of θ + 0.5z to fp32 (|θ| + 0.5|z| < 4: <= 2.4e-7); a wrong offset errs by O(1)
            assert lay["noise_err"] < 2e-6, (rank, n, lay)
    for r in ranks:
        assert r["losses"] == ranks[0]["ref_losses"]
        for n, want in ranks[0]["ref_params"].items():
            assert torch.equal(r["params"][n], want), n


def test_bad_arguments_are_refused_without_processes():
    import zo2

    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with pytest.raises(TypeError, match="process_group must be"):
        zo2.ZOSGD(model.parameters(), lr=0.1, process_group="world").step(lambda: torch.tensor(1.0))
    assert torch.equal(model.weight, before)  # refused before any pass
    with pytest.raises(TypeError, match=r"needs a zo2\.ZOSGD"):
        zo2.attach_fsdp(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no fully_shard module"):
        zo2.attach_fsdp(model, zo2.ZOSGD(model.parameters(), lr=0.1))
