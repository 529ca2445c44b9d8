"""Bad input to zo2.offload gets an error that names the problem and the fix, and a failed step leaves
the model intact and flushed (it holds the values of the last completed step)."""

import pytest
import torch
from torch import nn

import zo2
import zo2.plan
from memtrain.testing import assert_close_verbose
from zo2.halves import ClosureProtocolError


def batch():
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def offloaded(make_opt, **kwargs):
    model = make_opt(**kwargs)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-2, seed=1)
    zo2.offload(model, opt, device="cpu", verbose=False)
    return model, opt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}  # state_dict flushes


def assert_intact(model, opt, before):
    """Flushed, no block left on the device, every tensor at its value before the failed step (up to the
    rounding of the passes already applied, a few ulp, as for plain ZOSGD)."""
    assert not opt.offload_engine.dirty and not opt.offload_engine.resident_slot
    for k, v in model.state_dict().items():
        assert_close_verbose(v, before[k], atol=1e-6, rtol=0, name=k)


def test_model_without_a_block_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="blocks="):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cpu", verbose=False)


def test_explicit_blocks_and_bad_paths(make_opt):
    model = make_opt()
    engine = zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cpu", blocks="model.decoder.layers",
                         verbose=False)
    assert engine.block_path == "model.decoder.layers"
    other = make_opt()
    with pytest.raises(ValueError, match="not a submodule"):
        zo2.offload(other, zo2.ZOSGD(other.parameters()), device="cpu", blocks="model.nope", verbose=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_without_cuda(make_opt):
    model = make_opt()
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*device='cpu'"):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cuda", verbose=False)


def test_parameters_already_on_a_device(make_opt):
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters())
    model.to("meta")  # the same Parameter objects, now off the host
    with pytest.raises(ValueError, match=r"already on meta.*on the CPU"):
        zo2.offload(model, opt, device="cpu", verbose=False)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(amp="int8"), ValueError, "amp must be"),
    (dict(prefetch=-1), ValueError, "prefetch"),
    (dict(device="mps"), ValueError, "device must be"),
])
def test_bad_options(make_opt, kwargs, error, match):
    model = make_opt()
    with pytest.raises(error, match=match):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), verbose=False, **{"device": "cpu", **kwargs})


def test_amp_needs_an_fp32_model(make_opt):
    model = make_opt().to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"fp32 master.*float32"):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cpu", amp="bf16", verbose=False)


def test_wrong_optimizer_and_foreign_parameters(make_opt):
    model = make_opt()
    with pytest.raises(TypeError, match=r"zo2.ZOSGD"):
        zo2.offload(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", verbose=False)
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        zo2.offload(model, zo2.ZOSGD([*model.parameters(), stranger]), device="cpu", verbose=False)


def test_attached_twice(make_opt):
    model, opt = offloaded(make_opt)
    with pytest.raises(RuntimeError, match="already attached"):
        zo2.offload(model, opt, device="cpu", verbose=False)


def test_weight_tied_between_a_block_and_a_resident_module(make_opt):
    model = make_opt()
    model.model.decoder.final_layer_norm.weight = model.model.decoder.layers[1].final_layer_norm.weight
    with pytest.raises(ValueError, match="tied between a block and a resident module"):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cpu", verbose=False)


def test_not_enough_host_memory_prints_the_plan(make_opt, monkeypatch):
    monkeypatch.setattr(zo2.plan, "available_host_bytes", lambda: 10)
    model = make_opt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match=r"(?s)host store needs.*zo2.offload plan"):
        zo2.offload(model, zo2.ZOSGD(model.parameters()), device="cpu", amp="bf16", verbose=False)
    for k, v in model.state_dict().items():  # refused before anything moved
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("closure_kind", ["twice", "never", "raises", "returns_none"])
def test_bad_closure_leaves_the_model_intact_and_flushed(make_opt, closure_kind):
    model, opt = offloaded(make_opt)
    b = batch()
    opt.step(lambda: model(**b).loss)  # a good step first: its update is pending when the bad one runs
    before = snapshot(model)
    steps = opt.step_count

    def closure():
        if closure_kind == "never":
            return torch.tensor(1.0)
        loss = model(**b).loss
        if closure_kind == "twice":
            loss = loss + model(**b).loss
        if closure_kind == "raises":
            raise KeyError("boom")
        return None if closure_kind == "returns_none" else loss

    error = {"twice": ClosureProtocolError, "never": ClosureProtocolError, "raises": KeyError,
             "returns_none": TypeError}[closure_kind]
    match = {"twice": "second time", "never": "did not run the model", "raises": "boom",
             "returns_none": "returned None"}[closure_kind]
    with pytest.raises(error, match=match):
        opt.step(closure)
    assert opt.step_count == steps
    assert_intact(model, opt, before)
    opt.step(lambda: model(**b).loss)  # and training goes on
    assert opt.step_count == steps + 1


def test_dropout_in_training_mode_is_refused_and_nothing_moves(make_opt):
    model, opt = offloaded(make_opt, dropout=0.1)
    before = snapshot(model)
    model.train()
    with pytest.raises(ValueError, match=r"(?i)dropout"):
        opt.step(lambda: model(**batch()).loss)
    assert_intact(model, opt, before)


def test_observing_inside_the_closure_is_refused(make_opt):
    model, opt = offloaded(make_opt)

    def closure():
        loss = model(**batch()).loss
        opt.flush()
        return loss

    with pytest.raises(RuntimeError, match="while a step is running"):
        opt.step(closure)
