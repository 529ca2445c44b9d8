"""Dispatcher: per-shape automatic choice (cached), forced paths, bad names, which layers the CUDA "once" path
takes, the per-layer log and the env report's rules."""

import logging

import pytest
import torch
from torch import nn

import flashdp
from flashdp import dispatch


def test_auto_choice_by_shape_and_cache():
    assert dispatch.choose_path("cpu", 128, 512, 512) == "ghost"  # 2T² < in·out
    assert dispatch.choose_path("cpu", 1024, 16, 16) == "once"  # tiny layer, long sequence
    assert dispatch.choose_path("cuda", 128, 512, 512, cuda_once=True) == "once"
    assert dispatch.choose_path("cuda", 1024, 16, 16) == "direct"
    info = dispatch._auto.cache_info()
    dispatch.choose_path("cpu", 128, 512, 512)
    assert dispatch._auto.cache_info().hits == info.hits + 1


def test_force_path_and_env(monkeypatch):
    with dispatch.force_path("direct"):
        assert dispatch.choose_path("cpu", 128, 512, 512) == "direct"
        with dispatch.force_path(None):
            assert dispatch.choose_path("cpu", 128, 512, 512) == "ghost"
    monkeypatch.setenv("FLASHDP_PATH", "once")
    assert dispatch.choose_path("cpu", 128, 512, 512) == "once"
    monkeypatch.setenv("FLASHDP_PATH", "bogus")
    with pytest.raises(ValueError, match="FLASHDP_PATH"):
        dispatch.choose_path("cpu", 128, 512, 512)
    with pytest.raises(ValueError, match="unknown path"), dispatch.force_path("fast"):
        pass


# ------------------------------------------------------------------------------------------------------------
# The CUDA "once" path only for layers the cooperative kernel serves.

def _new_fits(d_out, d_in, device=None, *, dtype, has_bias, layout):
    _new_fits.calls.append((dtype, has_bias, layout))
    return has_bias  # pretend this kernel serves layers with a bias only


_new_fits.calls = []


@pytest.mark.parametrize(("dtype", "bias", "layout", "reason"), [
    (torch.bfloat16, False, "out_in", "fp32"),
    (torch.float16, False, "out_in", "fp32"),
    (torch.float32, True, "out_in", "bias"),
    (torch.float32, False, "in_out", "layout"),
])
def test_once_never_taken_for_layers_the_kernel_does_not_serve(dtype, bias, layout, reason):
    """Answered from the layer alone: nothing is built or launched, with or without CUDA."""
    from memtrain.kernels.dp_clip_once import cuda_once_reason

    dev = torch.device("cuda", 0)
    assert dispatch.cuda_once_serves(64, 64, dev, dtype=dtype, has_bias=bias, layout=layout) is False
    assert reason in cuda_once_reason(64, 64, dev, dtype=dtype, has_bias=bias, layout=layout)


def test_a_kernel_that_checks_the_layer_decides_itself():
    dev = torch.device("cuda", 0)
    assert dispatch.cuda_once_serves(64, 64, dev, dtype=torch.bfloat16, has_bias=True, layout="in_out",
                                     fits=_new_fits) is True
    assert dispatch.cuda_once_serves(64, 64, dev, dtype=torch.float32, has_bias=False, layout="out_in",
                                     fits=_new_fits) is False
    assert _new_fits.calls == [(torch.bfloat16, True, "in_out"), (torch.float32, False, "out_in")]


def _paths_logged(caplog):
    return [(r.args[0], r.args[1]) for r in caplog.records if r.name == "flashdp" and "path" in r.getMessage()]


def test_path_logged_once_per_layer_and_forced_path_kept_from_forward(caplog):
    caplog.set_level(logging.DEBUG, logger="flashdp")
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    flashdp.make_private(model, 1.0)
    x = torch.randn(3, 7, 6)
    with dispatch.force_path("direct"):
        loss = model(x).sum()
    loss.backward()  # outside the block: the layers keep the path forced during their forward
    assert sorted(_paths_logged(caplog)) == [("0", "direct"), ("2", "direct")]
    caplog.clear()
    model(x).sum().backward()  # automatic: T=7, 2·T² > in·out: "once" on CPU
    model(x).sum().backward()  # same choice: not logged again
    assert sorted(_paths_logged(caplog)) == [("0", "once"), ("2", "once")]
    caplog.clear()
    loss = model(x).sum()
    with dispatch.force_path("ghost"):  # a block active during backward wins
        loss.backward()
    assert sorted(_paths_logged(caplog)) == [("0", "ghost"), ("2", "ghost")]


def test_env_report_lists_the_dispatch_rules():
    from memtrain.env_report import report

    info = report()
    assert "flashdp dispatch (cpu)" in info and "flashdp dispatch (cuda)" in info
    assert "fp32, weight-only" in info["flashdp dispatch (cuda)"] and "ghost" in info["flashdp dispatch (cpu)"]
    # the kernel's status on a line of its own, not spliced into the middle of the rule's sentence
    cuda_rule = info["flashdp dispatch (cuda)"]
    assert "unavailable" not in cuda_rule and "whose tiles fit co-resident (cuda_once_fits" in cuda_rule
    assert info["flashdp dispatch (cuda 'once' kernel)"]


def test_once_kernel_built_ahead_once_per_cuda_device(monkeypatch):
    built = []
    monkeypatch.setattr(dispatch, "prepare", built.append)
    prepared = set()
    for dev in ("cuda:0", "cuda:0", "cpu", "cuda:1"):
        dispatch.prepare_once_kernel(torch.device(dev), prepared)
    assert built == [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setenv("FLASHDP_PATH", "ghost")  # forced off the kernel: nothing to build
    dispatch.prepare_once_kernel(torch.device("cuda", 2), prepared)
    assert len(built) == 2


def test_private_model_prepares_the_kernel_in_a_grad_forward_only(monkeypatch):
    seen = []
    monkeypatch.setattr(dispatch, "prepare_once_kernel", lambda device, prepared: seen.append(device))
    model = flashdp.make_private(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), 1.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        model(x)
    assert seen == []
    model(x).sum().backward()
    assert seen == [torch.device("cpu")]
