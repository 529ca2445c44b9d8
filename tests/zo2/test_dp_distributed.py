"""zo2.DPZOSGD data-parallel on gloo (2 CPU processes): the clipped per-sample differences are summed over
the ranks and the noise is added once, so 2 ranks with uneven shards train the trajectory of one process
with the whole batch."""

import pytest
import torch
import torch.distributed as dist

WORKER = """
import os, sys, warnings
import torch
import torch.distributed as dist
from torch import nn
import flashdp, zo2

rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
acct = flashdp.PrivacyAccountant("rdp")
opt = zo2.DPZOSGD(model.parameters(), lr=0.05, eps=1e-3, max_grad_norm=0.5, noise_multiplier=0.9,
                  expected_batch_size=10, seed=11, num_perturbations=2, accountant=acct, sample_rate=0.1,
                  secure_mode=(mode == "secure"), process_group=True)
if mode == "offload":
    zo2.offload(model, opt, device="cpu", blocks=[model[0], model[2]], verbose=False)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(8, 6, generator=g).double(), torch.randn(8, generator=g).double()
cut = [0, 8] if world == 1 else [0, 5, 8]  # uneven shards: per-sample sums, not means, cross the ranks
xs, ys = x[cut[rank]:cut[rank + 1]], y[cut[rank]:cut[rank + 1]]
grads = []
for t in range(4):
    def closure(t=t):
        losses = 3 * (model(xs * (1 + 0.1 * t)).squeeze(1) - ys) ** 2
        if t == 2 and rank == world - 1:
            losses[-1] = float("nan")  # one rank's bad sample skips the step on every rank
        return losses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zo2.NonFiniteLossWarning)
        opt.step(closure)
    grads.append(list(opt.projected_grads))
opt.flush()
torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "grads": grads,
            "accounted": acct.steps, "skipped": opt.skipped_steps}, f"{out}.{rank}")
dist.destroy_process_group()
"""

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def run(spawn_ranks, tmp_path, world: int, mode: str) -> list[dict]:
    out = str(tmp_path / f"{mode}{world}")
    spawn_ranks(WORKER, world, mode, out)
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.parametrize("mode", ["plain", "offload"])
def test_two_ranks_match_one_process_with_the_whole_batch(tmp_path, spawn_ranks, mode):
    """float64: the clipped sums differ from one process's only by the order of summation (a few ulp of
    a sum of ≤ 8 terms ≤ C = 0.5), and the noise is the same; the offload engine also groups the noise
    passes differently in fp32 z (tests/zo2/test_distributed.py's tolerances)."""
    (single,) = run(spawn_ranks, tmp_path, 1, "plain")
    ranks = run(spawn_ranks, tmp_path, 2, mode)
    rtol, atol = (1e-9, 1e-11) if mode == "plain" else (1e-6, 1e-8)
    for r in ranks:
        assert r["skipped"] == 1 and r["accounted"] == 3
        assert r["grads"][2] == []
        for got, ref in zip(r["grads"], single["grads"], strict=True):
            assert got == pytest.approx(ref, rel=rtol, abs=atol)
        for n, p in single["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=rtol, atol=atol, msg=n)
    for n in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n])  # bit-identical replicas


def test_secure_mode_ranks_add_rank_zeros_noise(tmp_path, spawn_ranks):
    """CSPRNG keys differ per process: rank 0's are broadcast, so the replicas stay bit-identical."""
    ranks = run(spawn_ranks, tmp_path, 2, "secure")
    assert ranks[0]["grads"] == ranks[1]["grads"]
    for n in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n])
