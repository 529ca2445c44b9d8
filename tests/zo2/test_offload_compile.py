"""torch.compile and CUDA graphs around the offloaded step are refused with the fix, and nothing moves."""

import pytest
import torch

import zo2


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (2, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


def _offloaded(make_opt):
    model = make_opt()
    opt = zo2.ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    zo2.offload(model, opt, device="cpu", verbose=False)
    return model, opt


def _refused_and_still(model, opt, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = opt.step_count
    with pytest.raises(RuntimeError, match=match):
        opt.step(lambda: model(**_batch()).loss)
    assert opt.step_count == steps
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.offload_engine.dirty


def test_a_compiled_model_is_refused_at_offload(make_opt):
    model = make_opt()
    with pytest.raises(RuntimeError, match=r"torch.compile is not supported.*offload the uncompiled model"):
        zo2.offload(torch.compile(model), zo2.ZOSGD(model.parameters()), device="cpu", verbose=False)
    model.compile()  # in place: the same module, its call compiled
    opt = zo2.ZOSGD(model.parameters())
    with pytest.raises(RuntimeError, match=r"torch.compile is not supported"):
        zo2.offload(model, opt, device="cpu", verbose=False)
    assert opt.offload_engine is None


def test_compiling_after_offload_is_refused_at_the_step(make_opt):
    model, opt = _offloaded(make_opt)
    model.compile()
    _refused_and_still(model, opt, "ZOSGD.step: torch.compile is not supported")


def test_a_step_traced_by_torch_compile_is_refused(make_opt, monkeypatch):
    model, opt = _offloaded(make_opt)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _refused_and_still(model, opt, r"torch.compile is not supported")


def test_a_step_under_cuda_graph_capture_is_refused(make_opt, monkeypatch):
    model, opt = _offloaded(make_opt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _refused_and_still(model, opt, r"CUDA graph capture is not supported.*outside torch.cuda.graph")


def test_plain_steps_are_not_refused(make_opt):
    """The checks are off the normal path: a step under neither runs."""
    model, opt = _offloaded(make_opt)
    opt.step(lambda: model(**_batch()).loss)
    assert opt.step_count == 1
