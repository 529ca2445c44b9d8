"""Kernel benchmarks: the bench/kernels scripts run end to end at tiny sizes (default run), and
pytest-benchmark micro-benchmarks of each kernel, CPU and GPU (``pytest -m benchmark tests/bench``).

The micro-benchmarks are deselected by default (pyproject addopts). Shapes are the OPT-125m/Llama-512 layer
sizes scaled so that one call takes milliseconds on a 2-core CPU; on a GPU pass ``--benchmark-min-rounds``
for steadier figures.
"""

import json
import runpy
import subprocess
import sys

import pytest
import torch

import zo2
from memtrain.kernels.dp_clip_accumulate import clip_factors, dp_clip_accumulate_
from memtrain.kernels.dp_clip_once import dp_clip_once_
from memtrain.kernels.dp_linear_norms import dp_linear_norms
from memtrain.kernels.philox import philox_fill_
from memtrain.kernels.zo_perturb import zo_perturb_

KERNEL_BENCHES = {
    "bench_dp_linear_norms": ["--shapes", "2,8,16,24", "3,5,7,9"],
    "bench_dp_clip_accumulate": ["--shapes", "2,8,16,24", "3,5,7,9"],
    "bench_dp_clip_once": ["--shapes", "2,8,16,24"],
    "bench_zo_perturb": ["--numel", "4099"],
}


@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_kernel_bench_runs(name, tmp_path, monkeypatch, capsys):
    """``python -m memtrain.bench.kernels.<name>`` at tiny sizes: a table on stdout and a JSON record."""
    out = tmp_path / f"{name}.json"
    argv = [name, *KERNEL_BENCHES[name], "--rounds", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module(f"memtrain.bench.kernels.{name}", run_name="__main__")
    assert "median ms" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["results"] and record["env"]["device"] == "cpu"


def test_kernel_bench_is_an_installed_module(tmp_path):
    """Runs from any directory through the installed package (no sys.path insertion in the scripts)."""
    out = tmp_path / "z.json"
    subprocess.run([sys.executable, "-m", "memtrain.bench.kernels.bench_zo_perturb", "--numel", "1031", "--rounds",
                    "1", "--warmup", "0", "--device", "cpu", "--out", str(out)], check=True, cwd=tmp_path,
                   capture_output=True)
    assert json.loads(out.read_text())["benchmark"] == "zo_perturb"


NUMEL = 4_000_000
B, T, D_IN, D_OUT = 8, 128, 512, 1376


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, fn, device):
    def call():
        fn()
        _sync(device)

    benchmark(call)


@pytest.mark.benchmark
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_philox_fill(benchmark, device, dist):
    out = torch.empty(NUMEL, device=device)
    _bench(benchmark, lambda: philox_fill_(out, seed=1, stream=0, dist=dist), device)


@pytest.mark.benchmark
@pytest.mark.parametrize("terms", [1, 2])
def test_zo_perturb(benchmark, device, terms):
    p = torch.zeros(NUMEL, device=device)
    seeds, coefs = [1, 2][:terms], [1e-3, -1e-3][:terms]
    _bench(benchmark, lambda: zo_perturb_(p, seeds, coefs, stream=0), device)


@pytest.fixture
def layer(device):
    g = torch.Generator(device=device).manual_seed(0)
    G = torch.randn(B, T, D_OUT, device=device, generator=g)
    X = torch.randn(B, T, D_IN, device=device, generator=g)
    return G, X, torch.zeros(D_OUT, D_IN, device=device), torch.zeros(D_OUT, device=device)


@pytest.mark.benchmark
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_dp_linear_norms(benchmark, device, layer, method):
    G, X, _, _ = layer
    _bench(benchmark, lambda: dp_linear_norms(G, X, with_bias=True, method=method), device)


@pytest.mark.benchmark
def test_dp_clip_accumulate(benchmark, device, layer):
    G, X, gw, gb = layer
    coef = clip_factors(dp_linear_norms(G, X, with_bias=True), 1.0, float(B))
    _bench(benchmark, lambda: dp_clip_accumulate_(G, X, coef, gw, gb), device)


@pytest.mark.benchmark
def test_dp_clip_once(benchmark, device, layer):
    G, X, gw, gb = layer
    _bench(benchmark, lambda: dp_clip_once_(G, X, gw, gb, 1.0, float(B)), device)


@pytest.mark.benchmark
def test_offload_ring_step(benchmark, device):
    """One offloaded ZO step of a small OPT: the transfer ring's cost over the forward passes."""
    from memtrain.bench.presets import build_model

    model = build_model("opt-tiny", torch.float32, "cpu").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    opt = zo2.ZOSGD(model.parameters(), lr=1e-7, eps=1e-3)
    engine = zo2.offload(model, opt, device=device)
    try:
        _bench(benchmark, lambda: opt.step(lambda: model(input_ids=ids, labels=ids).loss), device)
    finally:
        engine.detach()
