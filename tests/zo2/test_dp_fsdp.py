"""zo2.DPZOSGD over FSDP2 (``fully_shard``) on 2 gloo ranks: the trajectory of one process on the global batch.

Each rank computes the per-sample losses of its own rows (uneven: 3 and 2 of the 5), clips them, and the clipped
sums cross the ranks in DPZOSGD's one all-reduce; the noise, keyed by (seed, step) alone, is added once to the
global sum. The reference is one process, unsharded, whose closure returns the 5 per-sample losses of the whole
batch in one forward. Tiny OPT (tied embedding and head) and Llama in float64, q = 1 and 2, joint and aggregate
clipping, FSDP2's default and ``reshard_after_forward=False``, and a NaN in one rank's rows (every rank skips).
"""

import pathlib

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

TESTS_DIR = str(pathlib.Path(__file__).parent)

WORKER = """
import os, sys, warnings
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import flashdp, zo2

rank, world, port, out, tests_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
# The reference's group of one (every rank creates it): like the sharded run it then runs all 2q halves of the
# skipped step (alone, ZOSGD stops at the first NaN and restores θ through other fp32-accumulated passes).
ALONE = dist.new_group([0])
sys.path.insert(0, tests_dir)
from conftest import tiny_llama, tiny_opt

BLOCKS = {"opt": lambda m: m.model.decoder.layers, "llama": lambda m: m.model.layers}
BUILD = {"opt": lambda: tiny_opt().double(), "llama": lambda: tiny_llama().double()}
g = torch.Generator().manual_seed(1)
BATCHES = [torch.randint(0, 61, (5, 9), generator=g) for _ in range(3)]
CUT = [0, 3, 5]  # rank 0: rows 0-2, rank 1: rows 3-4 (uneven: sums, not means, must cross the ranks)
BAD_STEP = 1  # step 1's last row (rank 1's) has a NaN loss: every rank skips the step
# name: (model, DPZOSGD options, fully_shard options)
CONFIGS = {
    "opt-q1": ("opt", {"num_perturbations": 1}, {}),
    "opt-q2-joint": ("opt", {"num_perturbations": 2, "clipping": "joint"}, {}),
    "llama-q2-aggregate-keep-unsharded": ("llama", {"num_perturbations": 2, "clipping": "aggregate"},
                                          {"reshard_after_forward": False}),
    "opt-q1-secure": ("opt", {"num_perturbations": 1, "secure_mode": True}, {}),
}


def sharded(name, **kw):
    model = BUILD[name]()
    for block in BLOCKS[name](model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def make_opt(model, **kw):
    kw.setdefault("process_group", None)
    acct = flashdp.PrivacyAccountant("rdp")
    opt = zo2.DPZOSGD(model.parameters(), lr=5e-3, eps=1e-3, weight_decay=0.01, max_grad_norm=0.3,
                      noise_multiplier=1.0, expected_batch_size=5, seed=7, accountant=acct, sample_rate=0.1, **kw)
    return opt, acct


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def train(model, opt, acct, lo, hi, start=None):
    # three steps on rows lo:hi of each batch; start[t]: parameters to load before step t (the reference steps
    # from the sharded run's θ_t, so that each step is compared on its own)
    out = {"losses": [], "grads": [], "sizes": [], "after": []}
    for t, ids in enumerate(BATCHES):
        x = ids[lo:hi]
        if start is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(start[t][n])

        def closure(x=x, t=t):
            per_sample = zo2.per_sample_lm_loss(model(input_ids=x).logits, x)
            if t == BAD_STEP and hi == len(ids):
                per_sample = per_sample.clone()
                per_sample[-1] = float("nan")
            return per_sample

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", zo2.NonFiniteLossWarning)
            out["losses"].append(opt.step(closure).item())
        out["grads"].append(list(opt.projected_grads))
        out["sizes"].append(opt.last_batch_size)
        out["after"].append(full_params(model))
    out.update(accounted=acct.steps, skipped=opt.skipped_steps)
    return out


results = {}
for cname, (name, kw, shard_kw) in CONFIGS.items():
    model = sharded(name, **shard_kw)
    opt, acct = make_opt(model, **kw)
    zo2.attach_fsdp(model, opt)
    res = results[cname] = train(model, opt, acct, CUT[rank], CUT[rank + 1])
    if rank == 0 and not kw.get("secure_mode"):  # one process, unsharded, the whole batch in one forward
        ref = BUILD[name]()
        ref_opt, ref_acct = make_opt(ref, process_group=ALONE, **kw)
        start = [full_params(ref), *res["after"][:-1]]  # θ_0: the same build as the sharded model's
        res["reference"] = train(ref, ref_opt, ref_acct, 0, CUT[-1], start=start)
torch.save(results, f"{out}.{rank}")
dist.destroy_process_group()
"""


# Tolerances. Each reference step starts from the sharded run's θ_t, so a step is compared on its own:
# - losses: both runs do the same float64 arithmetic on the same rows, except the reduction order inside a batched
#   matmul (a row in a batch of 5 or of 3 and 2) and the order of summing ≤ 5 clipped terms (two partial sums and
#   the all-reduce). Allowing 2^13 unit roundings (u = 2^-53) along the forward of a loss |ℓ| ≈ ln 61 ≈ 4.1:
#   |Δℓ_i| ≤ 2^13·u·4.1 ≈ 4e-12.
# - g_k: each d_i is (ℓ+ − ℓ−)/2ε, so |Δd_i| ≤ 2·4e-12/2e-3 = 4e-9; clipping (joint or aggregate) is 1-Lipschitz;
#   Σ over B = 5 samples / B_exp = 5: |Δg_k| ≤ 4e-9 (the summation-order error, ≤ 5u·5C, is far below).
# - θ: the fused pass rounds each coefficient lr·g_k/q to fp32, so θ is bit-identical unless Δg moves a coefficient
#   across an fp32 rounding boundary; then the pass's fp32 sum ε·z + coef·z moves by ulp_fp32(coef)·|z| ≤ 2^-32·6
#   ≈ 1.4e-9 (coef ≤ lr·|g| < 5e-3·(B·C + 6σC)/B_exp < 4e-3; |z| > 6 has probability 2e-9 per element, < 4e-5
#   over 17k), plus at most one ulp of that sum (|sum| ≤ 6·(ε + 4e-3) < 2^-5: 2^-29 ≈ 1.9e-9): |Δθ| ≤ 3.3e-9.
# A bug in where the noise is added moves g by σC·|ζ|/B_exp = 0.06|ζ| (ζ ~ N(0, 1)): 10^7 times these bounds.
ATOL_LOSS, ATOL_G, ATOL_THETA = 4e-12, 4e-9, 3.3e-9


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, spawn_ranks):
    """Per step, the sharded run's mean L+, projected gradients and new θ equal one unsharded process's on the
    whole batch from the same θ (so the trajectories agree by induction); the NaN step is skipped on both ranks
    and not accounted; secure mode's replicas stay identical (rank 0's CSPRNG keys)."""
    out = str(tmp_path / "dp_fsdp")
    spawn_ranks(WORKER, 2, out, TESTS_DIR)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    mismatches = []
    for cname, res in ranks[0].items():
        for r in ranks:  # the replicas apply the identical update: bit-identical, every step
            assert r[cname]["grads"] == res["grads"], cname
            assert all(torch.equal(r[cname]["after"][-1][n], p) for n, p in res["after"][-1].items()), cname
            assert r[cname]["skipped"] == 1 and r[cname]["accounted"] == 2, cname  # the skipped step: not accounted
            assert r[cname]["grads"][1] == [], cname
            assert r[cname]["sizes"] == [5, 5, 5], cname  # the global batch: 3 + 2 rows
        ref = res.get("reference")
        if ref is None:  # secure mode: keys from the CSPRNG, no seeded reference
            continue
        assert ref["skipped"] == 1 and ref["accounted"] == 2 and ref["sizes"] == [5, 5, 5], cname
        for t in range(3):
            got, want = res["grads"][t], ref["grads"][t]
            if len(got) != len(want) or any(abs(a - b) > ATOL_G for a, b in zip(got, want, strict=False)):
                mismatches.append(f"{cname} step {t}: g {got} != {want}")
            if not abs(res["losses"][t] - ref["losses"][t]) <= ATOL_LOSS and t != 1:  # step 1: NaN on both
                mismatches.append(f"{cname} step {t}: mean L+ {res['losses'][t]} != {ref['losses'][t]}")
            for n, p in ref["after"][t].items():
                d = (res["after"][t][n] - p).abs().max().item()
                if d > ATOL_THETA:
                    mismatches.append(f"{cname} step {t}: {n} differs by {d:.3g}")
    assert not mismatches, "\n".join(mismatches)
