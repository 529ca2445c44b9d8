"""The block streamer's transfer timing (``engine.time_transfers``): every block up and down once, no
compute, and nothing observable changes (the model, the pending update, the trajectory)."""

import pytest
import torch

import zo2


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


def train(make_opt, amp, timed: bool):
    model = make_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01, seed=5)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, trace=True, verbose=False)
    seconds = []
    for s in range(3):
        batch = make_batch(s)
        opt.step(lambda b=batch: model(**b).loss)
        if timed:  # between steps: an update is pending (deferred) while the transfers run
            seconds.append(engine.time_transfers(rounds=2))
    return model, engine, seconds


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_time_transfers_changes_nothing(make_opt, amp):
    plain_model, plain_engine, _ = train(make_opt, amp, timed=False)
    model, engine, seconds = train(make_opt, amp, timed=True)
    assert len(seconds) == 3 and all(isinstance(s, float) and s > 0 for s in seconds)
    for (name, p), q in zip(model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # state_dict flushes: same trained values, bit for bit
    assert engine.trace == plain_engine.trace  # the timing is not part of the schedule


def test_time_transfers_arguments_and_timing_inside_a_step(make_opt):
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=0)
    engine = zo2.offload(model, opt, device="cpu", verbose=False)
    assert engine.time_transfers() > 0
    with pytest.raises(ValueError, match="rounds"):
        engine.time_transfers(rounds=0)

    def closure():
        loss = model(**make_batch(0)).loss
        engine.time_transfers()
        return loss

    with pytest.raises(RuntimeError, match="between steps"):
        opt.step(closure)
    opt.step(lambda: model(**make_batch(0)).loss)  # the failed step was undone; training goes on
    assert opt.step_count == 1
