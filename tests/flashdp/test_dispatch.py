"""Dispatcher: per-shape automatic choice (cached), forced paths, bad names."""

import pytest

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
