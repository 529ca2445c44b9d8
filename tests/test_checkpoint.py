"""memtrain.checkpoint: resume continues an uninterrupted run bit for bit; an interrupted save harms nothing."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import flashdp
import zo2
from memtrain.checkpoint import load_checkpoint, save_checkpoint

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def zo_run(steps: int, start: int = 0, ckpt=None, save_at=None):
    model = mlp(0 if ckpt is None else 99)  # a resumed run starts from other weights: all must come from ckpt
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5, num_perturbations=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)["step"]
    for t in range(start, steps):
        b = slice(8 * (t % 8), 8 * (t % 8) + 8)
        opt.step(lambda b=b: nn.functional.mse_loss(model(X[b]), Y[b]))
        sched.step()
        if save_at is not None and t + 1 == save_at[0]:
            save_checkpoint(save_at[1], model=model, optimizer=opt, scheduler=sched, extra={"step": t + 1})
    return model


def dp_run(steps: int, ckpt=None, save_at=None):
    model = flashdp.make_private(mlp(0 if ckpt is None else 99), 1.0)
    acct = flashdp.PrivacyAccountant("rdp")
    opt = flashdp.DPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), noise_multiplier=1.0,
                              expected_batch_size=8, seed=3, accountant=acct, sample_rate=8 / 64)
    gen = torch.Generator().manual_seed(7)
    loader = flashdp.poisson_loader(torch.utils.data.TensorDataset(X, Y), sample_rate=8 / 64, generator=gen)
    start = 0
    if ckpt is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=opt, accountant=acct)
        start = extra["step"]
        gen.set_state(extra["sampler"])
    it = iter(loader)
    for t in range(start, steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        if len(x):
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if save_at is not None and t + 1 == save_at[0]:
            it = None  # an iterator in flight holds sampler state of its own: save at an epoch boundary
            save_checkpoint(save_at[1], model=model, optimizer=opt, accountant=acct,
                            extra={"step": t + 1, "sampler": gen.get_state()})
            it = iter(loader)
    return model, acct


def assert_bitwise(a: nn.Module, b: nn.Module):
    pairs = zip(a.named_parameters(), b.named_parameters(), strict=True)
    bad = [n for (n, p), (_, q) in pairs if not torch.equal(p, q)]
    assert not bad, f"resumed run differs from the uninterrupted one in {bad}"


def test_zo2_resume_is_bit_exact(tmp_path):
    path = tmp_path / "zo.pt"
    full = zo_run(10, save_at=(4, path))
    assert_bitwise(zo_run(10, ckpt=path), full)
    assert_bitwise(zo_run(10), full)  # saving does not perturb the run either


def test_flashdp_resume_is_bit_exact_with_accountant(tmp_path):
    path = tmp_path / "dp.pt"
    full, acct_full = dp_run(16, save_at=(8, path))  # 8 steps = one expected epoch of 64/8
    resumed, acct = dp_run(16, ckpt=path)
    assert_bitwise(resumed, full)
    assert acct.steps == acct_full.steps == 16
    assert acct.epsilon(1e-5) == acct_full.epsilon(1e-5)


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    zo_run(3, save_at=(2, path))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optimizer"]["zo2"]["step"] == 2 and "rng" in ckpt
    dp_run(9, save_at=(8, tmp_path / "d.pt"))
    ckpt = torch.load(tmp_path / "d.pt", weights_only=True)
    assert ckpt["optimizer"]["flashdp"]["steps"] == 8 and len(ckpt["accountant"]["history"]) >= 1


def test_missing_part_is_an_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=mlp(0))
    with pytest.raises(KeyError, match="optimizer"):
        load_checkpoint(path, optimizer=torch.optim.SGD(mlp(0).parameters(), lr=1.0))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a memtrain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    model = mlp(0)
    save_checkpoint(path, model=model)
    good = path.read_bytes()
    import memtrain.checkpoint as ck

    def half_written(obj, f):
        f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=mlp(1))
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # the temporary file is removed


KILLED_SAVE = """
import os, signal, sys
import torch
import memtrain.checkpoint as ck
path = sys.argv[1]
ck.save_checkpoint(path, model=torch.nn.Linear(4, 4))
real_fsync = os.fsync
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die after writing, before the rename
ck.save_checkpoint(path, model=torch.nn.Linear(300, 300))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    model = nn.Linear(4, 4)
    load_checkpoint(path, model=model, rng=False)  # the first checkpoint, whole
    strays = [p for p in os.listdir(tmp_path) if p != "c.pt"]
    assert len(strays) == 1 and strays[0].startswith(".c.pt.tmp-")
