"""zo2.offload and plain ZOSGD are the same optimizer however the forward reads the resident parameters.

The toy model reads resident weights the ways Hugging Face models do: an embedding's weight read
directly while its forward never runs (ProphetNet's ``ngram_embeddings.weight``), a ``ParameterList``
(Reformer's axial position embeddings), a resident weight read between blocks and again after them
(a tied head as ``h @ embed.weight.T``), and modules the forward never calls, resident (an idle vision
tower) and inside a block. Plain ZOSGD moves every one of them by -lr·g·z; so must the engine.

The model is float64, but the fused noise pass accumulates Σ_j a_j·z_j in fp32 (memtrain.kernels.zo_perturb)
and the two runs group their terms differently (the engine fuses step t's update into step t+1's
perturbation): θ differs by up to 2^-24·Σ|a_j z_j| ≤ 6e-8·(ε + lr·|g|)·|z|max ≈ 6e-8·0.1·6 < 4e-8 per
element per step, the same in both halves of a step. g is a smooth function of θ (|∂g/∂θ|₁ = |Hz|₁,
< 100 for this toy), so |Δg| < 4e-6 per step, and the parameters differ by < 4e-8 per step plus
lr·|Δg|·|z|max = 1e-2·4e-6·6 < 3e-7. The bugs guarded against are far larger: a resident tensor at
another half's perturbation moves g by ~1e-2 relative (|g| ~ 1-10 here), and an idle parameter left
behind is off by lr·|g|·|z| ~ 1e-2.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zo2
from memtrain.testing import assert_close_verbose

G_TOL = 2e-5  # the bound on Δg above, 5x, over the 3 steps
P_TOL = 2e-6  # 3 steps of (4e-8 + 3e-7), doubled


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.idle = nn.Linear(d, 3)  # never called: plain ZOSGD still moves it

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h))


class DirectReads(nn.Module):
    """A causal-LM-shaped toy whose forward reads resident weights outside their modules' forwards."""

    def __init__(self, vocab: int = 13, d: int = 8, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.ngram = nn.Embedding(2, d)  # read as .weight; its forward never runs
        self.axial = nn.ParameterList([nn.Parameter(torch.randn(7, d)), nn.Parameter(torch.randn(d))])
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.tower = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # idle on text input

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.axial[0][:t] + self.ngram.weight[0]
        for layer in self.layers:
            h = layer(h) + 0.3 * self.ngram.weight[1]  # read between blocks, in the block's turn
        h = self.norm(h) * self.axial[1]
        logits = h @ self.embed.weight.T  # the head tied to the embedding, read after the blocks
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def run_pair(model, batches, steps_kwargs, offload_kwargs=None):
    plain, offloaded = model, copy.deepcopy(model)
    opt_plain = zo2.ZOSGD(plain.parameters(), **steps_kwargs)
    opt_off = zo2.ZOSGD(offloaded.parameters(), **steps_kwargs)
    zo2.offload(offloaded, opt_off, device="cpu", verbose=False, **(offload_kwargs or {}))
    for ids, labels in batches:
        loss_plain = opt_plain.step(lambda i=ids, la=labels: plain(i, la))
        loss_off = opt_off.step(lambda i=ids, la=labels: offloaded(i, la))
        assert loss_off.item() == pytest.approx(loss_plain.item(), abs=G_TOL)
        assert opt_off.projected_grads == pytest.approx(opt_plain.projected_grads, abs=G_TOL)
    opt_off.flush()
    return plain, offloaded


def toy_batches(n: int = 3, vocab: int = 13):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, vocab, (2, 5), generator=g), torch.randint(0, vocab, (2, 5), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("q", [1, 2])
def test_resident_weights_read_outside_their_modules_match_plain_zosgd(q):
    torch.manual_seed(0)
    model = DirectReads().double().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, offloaded = run_pair(model, toy_batches(), dict(lr=1e-2, eps=1e-3, seed=4, num_perturbations=q))
    for (name, p), r in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        assert_close_verbose(p, r, atol=P_TOL, rtol=0, name=name)
        assert not torch.equal(p, before[name]), f"{name} was never updated"  # idle ones move too


def test_idle_parameters_move_under_amp():
    """Under bf16 AMP (fp32 masters: on the host for blocks, on the device for residents) the idle tower
    and the idle Linear of each block get plain ZOSGD's fp32 update for the same g. The losses are
    computed in bf16, so the plain run is fed the offloaded run's g (L± = ±g·ε) rather than its own.
    Tolerance: plain ZOSGD makes 3 fp32 passes per step and the master 1, each rounding θ (|θ| < 1) by
    ≤ ulp(1)/2 = 6e-8: < 2.4e-7 per step, 2 steps, doubled."""
    torch.manual_seed(1)
    model = DirectReads().eval()
    kwargs = dict(lr=1e-2, eps=1e-3, seed=7)
    plain, offloaded = model, copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_plain = zo2.ZOSGD(plain.parameters(), **kwargs)
    opt_off = zo2.ZOSGD(offloaded.parameters(), **kwargs)
    zo2.offload(offloaded, opt_off, device="cpu", verbose=False, amp="bf16")
    for ids, labels in toy_batches(2):
        opt_off.step(lambda i=ids, la=labels: offloaded(i, la))
        g = opt_off.projected_grad
        losses = iter([g * kwargs["eps"], -g * kwargs["eps"]])
        opt_plain.step(lambda it=losses: torch.tensor(next(it), dtype=torch.float64))
        assert opt_plain.projected_grad == pytest.approx(g, rel=1e-12)
    opt_off.flush()
    idle = [n for n, _ in model.named_parameters() if n.startswith("tower") or ".idle." in n]
    assert len(idle) == 4 + 2 * 3
    plain_params = dict(plain.named_parameters())
    for name, p in offloaded.named_parameters():
        if name in idle:
            assert_close_verbose(p, plain_params[name], atol=1e-6, rtol=0, name=name)
            assert not torch.equal(p, before[name]), f"{name} was never updated"


def test_amp_resident_copy_read_after_many_blocks_is_one_rounding_from_its_point():
    """Under bf16 AMP the head tied to the embedding is read after every block of a half. Its bf16 copy
    must be bf16(bf16(θ) ± ε·z) with z from the independent NumPy Philox, rounded once. A copy flipped in
    place on each of the H·(blocks + 1) turns is rounded on every turn and drifts from it."""
    from memtrain.testing import philox_noise_numpy

    torch.manual_seed(2)
    model = DirectReads(vocab=200, n_layers=12).eval()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=9)
    zo2.offload(model, opt, device="cpu", verbose=False, amp="bf16")
    stream = next(i for i, (p, _) in enumerate(opt.unique_params()) if p is model.embed.weight)
    master = model.embed.weight.detach().clone()  # fp32, clean θ before step 0
    seen = []

    def closure(ids, labels):
        loss = model(ids, labels)
        seen.append(model.embed.weight.detach().clone())  # after the blocks: the copy the head read
        return loss

    ids, labels = toy_batches(1)[0]
    opt.step(lambda: closure(ids, labels))
    z = torch.from_numpy(philox_noise_numpy(opt.seeds_for_step(0)[0], stream, master.numel())).view_as(master)
    for half, sign in enumerate((1.0, -1.0)):
        got = seen[half].double()
        want = (master.to(torch.bfloat16).double() + sign * 1e-2 * z).to(torch.bfloat16).double()
        assert seen[half].dtype == torch.bfloat16
        # one rounding of the same value: equal unless the exact value lies within the kernel's fp32 error
        # (~6e-8 relative) of a bf16 rounding midpoint, a chance of ~1e-5 per element (1600 elements here)
        off = int((got != want).sum())
        assert off <= 1, f"half {half}: {off} of {got.numel()} elements differ from one rounding of θ ± εz"
