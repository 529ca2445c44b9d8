"""Forwards outside a step (evaluation) under offload: they stream the blocks with the step's prefetch,
give the loss of the plain model with the same weights, and under AMP cast each block once per forward
into a staging slot.

Reference: a plain (not offloaded) copy of the flushed weights, in the dtype the engine computes in (the
fp32 weights natively, their round-to-nearest bf16 casts under AMP). Same weights, same operations, same
dtype: the losses are equal bit for bit, so the tolerance is 0."""

import copy

import pytest
import torch

import zo2

from .conftest import tiny_opt


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    return {"input_ids": ids, "labels": ids}


def plain_reference(model, amp):
    """A plain copy of ``model``'s flushed weights, cast as the engine computes under ``amp``."""
    ref = tiny_opt(num_hidden_layers=3)
    ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return ref.to(torch.bfloat16) if amp else ref


def casts(engine) -> int:
    return sum(s.casts for s in engine.stores) + getattr(engine.precision, "resident_casts", 0)


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_eval_forward_streams_with_prefetch_and_equals_the_plain_model(amp, prefetch):
    model = tiny_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=5e-3, eps=1e-2, seed=3)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, prefetch=prefetch, trace=True, verbose=False)
    for batch in (make_batch(0), make_batch(1)):
        opt.step(lambda b=batch: model(**b).loss)
    batch = make_batch(7)
    engine.trace.clear()
    with torch.no_grad():
        loss = model(**batch).loss
        ref = plain_reference(model, amp)(**batch).loss
    assert loss.item() == ref.item()
    # the schedule: prefetch + 1 blocks uploaded before the first block leaves, then one per departure
    ops = [(e.op, e.block) for e in engine.trace if e.op in ("upload", "offload")]
    n, ahead = 3, min(prefetch + 1, 3)
    expected = [("upload", b) for b in range(ahead)]
    for b in range(n):
        expected.append(("offload", b))
        if b + ahead < n:
            expected.append(("upload", b + ahead))
    assert ops == expected
    assert not engine.resident_slot  # every block went home


def test_repeated_evals_cast_each_block_once_per_forward_and_see_each_step():
    """Under AMP no low-precision copy of the model persists: each evaluation forward casts each block's
    flushed master once into a staging slot (resident masters only when they changed), and sees the
    masters a step changed."""
    model = tiny_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=5e-2, eps=1e-2, seed=3)
    engine = zo2.offload(model, opt, device="cpu", amp="bf16", prefetch=1, verbose=False)
    opt.step(lambda: model(**make_batch(0)).loss)
    batch = make_batch(7)
    with torch.no_grad():
        first = model(**batch).loss.item()
        after_first = casts(engine)
        for _ in range(3):
            assert model(**batch).loss.item() == first
        assert casts(engine) == after_first + 3 * len(engine.stores)  # one cast per block per forward
        opt.step(lambda: model(**make_batch(1)).loss)
        second = model(**batch).loss.item()  # the step changed the masters: see it
        ref = plain_reference(model, "bf16")(**batch).loss.item()
    assert second == ref and second != first


def test_a_block_called_on_its_own_and_a_failed_eval_leave_nothing_resident():
    model = tiny_opt(num_hidden_layers=3)
    opt = zo2.ZOSGD(model.parameters(), lr=5e-3, seed=3)
    engine = zo2.offload(model, opt, device="cpu", prefetch=2, verbose=False)
    opt.step(lambda: model(**make_batch(0)).loss)
    layer = model.model.decoder.layers[1]
    hidden = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = layer(hidden)[0]
        ref = copy.deepcopy(plain_reference(model, None).model.decoder.layers[1])(hidden)[0]
    assert torch.equal(out, ref) and not engine.resident_slot
    with pytest.raises(IndexError), torch.no_grad():
        model(input_ids=torch.full((1, 4), 999))  # out of the vocabulary: raises inside the forward
    state = model.state_dict()  # observing brings every block home
    assert not engine.resident_slot
    assert all(v.device.type == "cpu" for v in state.values())
