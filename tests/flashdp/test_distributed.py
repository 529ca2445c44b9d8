"""Under torch.distributed (gloo, 2 CPU processes): clipped sums all-reduced, noise added once, not per rank."""


import pytest
import torch
import torch.distributed as dist
from torch import nn

WORKER = """
import os, sys
import torch
import torch.distributed as dist
from torch import nn
import flashdp

rank, world, port, sigma, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Linear(40, 50)
with torch.no_grad():
    model.weight.zero_()
    model.bias.zero_()
flashdp.make_private(model, 1.0)
opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                          expected_batch_size=4, seed=123 + rank)
torch.manual_seed(rank)
x = torch.randn(2, 40)  # each rank: its own 2 samples
model(x).sum().backward()
opt.step()
torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}.{rank}")
dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_sums_ranks_and_noises_once(tmp_path, ref, spawn_ranks):
    out = str(tmp_path / "params")
    for sigma in (0.0, 1.0):
        spawn_ranks(WORKER, 2, str(sigma), f"{out}{sigma}")
    r0, r1 = torch.load(f"{out}0.0.0"), torch.load(f"{out}0.0.1")
    for n in r0:
        torch.testing.assert_close(r0[n], r1[n])  # all ranks take the same step
    torch.manual_seed(0)
    model = nn.Linear(40, 50)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    xs = []
    for rank in range(2):
        torch.manual_seed(rank)
        xs.append(torch.randn(2, 40))
    x = torch.cat(xs)
    want, _, _ = ref.per_sample_clipped_sum(model, lambda m, b: m(x[b:b + 1].double()).sum(), 4, 1.0)
    for n in r0:  # σ=0: update = −(clipped sum over both ranks' samples) / expected_batch_size (all clipped here)
        torch.testing.assert_close(r0[n].double(), -want[n] / 4, rtol=1e-5, atol=1e-6)
    n0, n1 = torch.load(f"{out}1.0.0"), torch.load(f"{out}1.0.1")
    noise = torch.cat([(n0[n] - r0[n]).flatten() for n in r0]) * 4
    torch.testing.assert_close(n0["weight"], n1["weight"])
    # one group (weight+bias), C_l = C = 1: one draw of N(0, σ²) in total, not √2σ as two ranks' noise would give
    assert noise.std().item() == pytest.approx(1.0, rel=0.08)


DDP_WORKER = """
import os, sys
import torch
import torch.distributed as dist
from torch import nn
import flashdp

rank, world, port, wrap, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))
flashdp.make_private(model, 1.0)
if wrap == "flashdp":
    model = flashdp.DistributedDataParallel(model)
elif wrap == "torch":
    model = nn.parallel.DistributedDataParallel(model)
calls = []
real_all_reduce = dist.all_reduce
def counting_all_reduce(*a, **k):  # counts the all-reduces made by DPOptimizer.step, not by DDP's hooks
    if sys._getframe(1).f_code.co_name == "step":
        calls.append(1)
    return real_all_reduce(*a, **k)
dist.all_reduce = counting_all_reduce
opt = flashdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0,
                          expected_batch_size=8, seed=123)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(8, 10, generator=g), torch.randn(8, 3, generator=g)
per_rank = 8 // world
for step in range(2):
    xs = x[rank * per_rank:(rank + 1) * per_rank] + step
    ys = y[rank * per_rank:(rank + 1) * per_rank]
    nn.functional.mse_loss(model(xs), ys).backward()
    opt.step()
    opt.zero_grad()
torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "optimizer_all_reduces": len(calls)},
           f"{out}.{rank}")
dist.destroy_process_group()
"""


def _spawn_ddp(spawn_ranks, tmp_path, world: int, wrap: str) -> list[dict]:
    out = str(tmp_path / f"{wrap}{world}")
    spawn_ranks(DDP_WORKER, world, wrap, out)
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("wrap", ["flashdp", "torch"])
def test_ddp_two_ranks_match_one_process_with_whole_batch(tmp_path, wrap, spawn_ranks):
    """Per-sample clipping on each rank, DDP's all-reduce, noise once: the update of one process, same seed."""
    (single,) = _spawn_ddp(spawn_ranks, tmp_path, 1, "none")
    ranks = _spawn_ddp(spawn_ranks, tmp_path, 2, wrap)
    for r in ranks:
        for n, p in single["params"].items():
            name = n if n in r["params"] else f"module.{n}"
            torch.testing.assert_close(r["params"][name], p, rtol=1e-5, atol=1e-6, msg=f"{wrap}: {n}")
    # flashdp's DDP sums during backward, so the optimizer has nothing left to all-reduce; plain DDP averages
    # and the optimizer sums the averages (its all-reduces are counted here)
    assert all((r["optimizer_all_reduces"] == 0) == (wrap == "flashdp") for r in ranks)
