"""Every Triton launcher runs its kernel under the tensors' CUDA device, not the current one, and makes that
device's context current in a thread that has none yet (kernels/_launch.py).

No GPU is needed: the tensors are CPU tensors under the Triton interpreter that the launch guard is told live
on ``cuda:1``; ``torch.cuda.device`` and the stream query are recorders, and each kernel is wrapped to record
the device current when it is launched. The kernels still run (the interpreter) and their results are checked
against the same call without the fake device.
"""

import contextlib
import threading

import pytest
import torch

from memtrain.kernels import _launch as L
from memtrain.kernels import dp_clip_accumulate as A
from memtrain.kernels import dp_linear_norms as N
from memtrain.kernels import philox as P
from memtrain.kernels import zo_perturb as Z

FAKE = torch.device("cuda", 1)


class FakeCuda:
    """torch.cuda's device guard and stream query, recorded; ``current`` is the device index made current."""

    def __init__(self):
        self.current = 0
        self.entered: list[int] = []
        self.queries: list[tuple[int, int]] = []  # (thread id, device index)

    @contextlib.contextmanager
    def device(self, index):
        self.entered.append(int(index))
        before, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = before

    def current_stream(self, index):
        outer = self

        class Stream:
            def query(self):
                outer.queries.append((threading.get_ident(), int(index)))
                return True

        return Stream()


class RecordingKernel:
    """``kernel[grid](...)`` that records the device current at the launch, then launches."""

    def __init__(self, kernel, cuda: FakeCuda, launches: list[int]):
        self.kernel, self.cuda, self.launches = kernel, cuda, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(self.cuda.current)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def fake_cuda1(monkeypatch, triton_device):
    if triton_device != "cpu":
        pytest.skip("fakes a second GPU for CPU tensors under the Triton interpreter")
    cuda, launches = FakeCuda(), []
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(L, "_device_of", lambda t: FAKE)
    monkeypatch.setattr(L, "_CONTEXTS", threading.local())
    for module, name in ((P, "_philox_fill_kernel"), (Z, "_zo_perturb_kernel"), (A, "_dp_clip_accumulate_kernel"),
                         (N, "_dp_linear_norms_direct_kernel"), (N, "_dp_linear_norms_ghost_kernel")):
        monkeypatch.setattr(module, name, RecordingKernel(getattr(module, name), cuda, launches))
    return cuda, launches


def _philox(t):
    P._philox_fill_triton(t, 5, 3, P.dist_code("normal"), 7)
    return t


def _perturb(t):
    Z._zo_perturb_triton(t, [11, 12], [1e-3, -2e-3], 4, 0.5, P.dist_code("normal"), 0)
    return t


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 4, generator=g), torch.rand(2, generator=g)


LAUNCHERS = {
    "philox_fill_": lambda: _philox(torch.zeros(1000)),
    "zo_perturb_": lambda: _perturb(torch.ones(1000)),
    "dp_clip_accumulate_": lambda: (lambda G, X, c: (A._dp_clip_accumulate_triton(G, X, c, w := torch.zeros(6, 4), None,
                                                                                 "out_in"), w)[1])(*_inputs()),
    "dp_linear_norms direct": lambda: N._dp_linear_norms_triton(*_inputs()[:2], False, "direct"),
    "dp_linear_norms ghost": lambda: N._dp_linear_norms_triton(*_inputs()[:2], False, "ghost"),
}


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launch_runs_under_the_tensors_device(name, fake_cuda1, monkeypatch):
    cuda, launches = fake_cuda1
    got = LAUNCHERS[name]()
    assert launches == [1] and cuda.entered == [1] and cuda.current == 0  # device 0 current again after
    monkeypatch.setattr(L, "_device_of", lambda t: t.device)  # the same call on the CPU tensors as they are
    assert torch.equal(got, LAUNCHERS[name]())


def test_a_thread_makes_the_context_current_once_per_device(fake_cuda1):
    """The first launch of each thread queries the device's stream (binding its context); later ones do not."""
    cuda, launches = fake_cuda1

    # One thread launches at a time (the fake device state is global), and the first stays alive while the second
    # runs, so their idents differ (an ended thread's ident is reused).
    first_done, release = threading.Event(), threading.Event()

    def worker(first: bool):
        LAUNCHERS["philox_fill_"]()
        LAUNCHERS["zo_perturb_"]()
        if first:
            first_done.set()
            release.wait(timeout=60)

    one = threading.Thread(target=worker, args=(True,))
    one.start()
    assert first_done.wait(timeout=60)
    two = threading.Thread(target=worker, args=(False,))
    two.start()
    two.join()
    release.set()
    one.join()
    assert launches == [1, 1, 1, 1]
    assert len(cuda.queries) == 2 and {q[1] for q in cuda.queries} == {1}
    assert len({q[0] for q in cuda.queries}) == 2  # one per thread


def test_cpu_tensors_touch_no_cuda(monkeypatch, triton_device):
    if triton_device != "cpu":
        pytest.skip("CPU tensors under the Triton interpreter")

    def forbidden(*a, **k):
        raise AssertionError("a CPU launch touched torch.cuda")

    monkeypatch.setattr(torch.cuda, "device", forbidden)
    monkeypatch.setattr(torch.cuda, "current_stream", forbidden)
    LAUNCHERS["philox_fill_"]()
