"""The offload engine's schedule, read from its trace: every block is uploaded and offloaded exactly once
per step, the ring never holds more blocks than it has slots, a block is computed only after its upload
and before its offload, and all halves pass through a block before the next block is computed."""

import pytest
import torch

import zo2


def run_traced(model, steps, prefetch, q, amp=None):
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=3, num_perturbations=q)
    engine = zo2.offload(model, opt, device="cpu", amp=amp, prefetch=prefetch, trace=True, verbose=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 61, (2, 7), generator=g)
        opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
    return engine


@pytest.mark.parametrize(("prefetch", "q", "amp"), [(0, 1, None), (1, 1, None), (2, 2, None), (1, 1, "bf16"),
                                                    (5, 1, None)])
def test_schedule_invariants(make_opt, prefetch, q, amp):
    num_blocks = 4
    engine = run_traced(make_opt(num_hidden_layers=num_blocks), steps=3, prefetch=prefetch, q=q, amp=amp)
    halves = 2 * q
    slots = engine.ring.slots
    assert slots == prefetch + 1
    for step in range(3):
        events = [e for e in engine.trace if e.step == step and e.op != "flush"]
        for b in range(num_blocks):
            assert sum(e.op == "upload" and e.block == b for e in events) == 1
            assert sum(e.op == "offload" and e.block == b for e in events) == 1
        resident, order = {}, []
        for i, e in enumerate(events):
            if e.op == "upload":
                resident[e.block] = e.slot
                assert len(resident) <= slots, f"{len(resident)} blocks resident with {slots} slots"
                assert list(resident.values()).count(e.slot) == 1, "two resident blocks share a slot"
            elif e.op == "offload":
                assert resident.pop(e.block) == e.slot
            elif e.op == "compute":
                assert e.block in resident, f"block {e.block} computed while not resident (event {i})"
                order.append((e.block, e.half))
        # dual forward per resident block: every half passes block b before block b+1
        assert order == [(b, h) for b in range(num_blocks) for h in range(halves)]
        # prefetch: the first min(slots, num_blocks) uploads are issued before the first compute
        first_compute = next(i for i, e in enumerate(events) if e.op == "compute")
        assert sum(e.op == "upload" for e in events[:first_compute]) == min(slots, num_blocks)


def test_amp_prepares_each_master_once_per_step_after_the_first(make_opt):
    engine = run_traced(make_opt(num_hidden_layers=3), steps=3, prefetch=1, q=1, amp="bf16")
    for step in range(3):
        prepared = [e.block for e in engine.trace if e.step == step and e.op == "prepare"]
        assert prepared == ([] if step == 0 else [0, 1, 2])


def test_one_fused_pass_per_half_and_block(make_opt, monkeypatch):
    """Per step each block is moved once per half: restore + update + perturb fused for the first half,
    then one flip per further half. A resident parameter (the tied embedding of OPT is one tensor) is
    moved each time a half takes the baton, (blocks + 1) times per half: it may be read anywhere."""
    import zo2.noise as noise

    model = make_opt(num_hidden_layers=2)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, seed=3)
    zo2.offload(model, opt, device="cpu", verbose=False)
    calls = []
    real = noise.zo_perturb_

    def counting(p, seeds, coefs, stream, c, dist):
        calls.append((stream, len(seeds)))
        return real(p, seeds, coefs, stream, c, dist)

    monkeypatch.setattr(noise, "zo_perturb_", counting)
    ids = torch.randint(0, 61, (2, 7))
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    calls.clear()
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    streams = [s for s, _ in calls]
    trainable = len([p for p in model.parameters() if p.requires_grad])
    tied = dict(model.named_parameters())["model.decoder.embed_tokens.weight"]
    tied_stream = next(i for i, (p, _) in enumerate(opt.unique_params()) if p is tied)
    in_blocks = {id(p) for layer in model.model.decoder.layers for p in layer.parameters()}
    resident = {i for i, (p, _) in enumerate(opt.unique_params()) if id(p) not in in_blocks}
    assert tied_stream in resident
    # 2 halves, each taking the baton before block 0, 1 and for its epilogue with block 1
    assert all(streams.count(s) == 2 * 3 for s in resident)
    assert all(streams.count(s) == 2 for s in set(streams) - resident)
    assert len(set(streams)) == trainable
    # the first move of a step carries two seeds (the last step's restore + update and this step's +εz)
    first = {}
    for s, n in calls:
        first.setdefault(s, n)
    assert set(first.values()) == {2}
