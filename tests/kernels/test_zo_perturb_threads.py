"""The C++ CPU passes' thread bound (memtrain.kernels.zo_perturb.cpu_threads): honoured (the threads that ran
a pass, as the kernel reports them), the calling thread's alone, and without effect on the result, bit for
bit, against the unbounded kernel, the torch twin and torch's own cast."""

import threading

import pytest
import torch

from memtrain._cpp import cpp_available, require_cpp
from memtrain.kernels import zo_perturb as Z

pytestmark = pytest.mark.skipif(not cpp_available(), reason="needs memtrain's C++ extension")

BLOCK, GRAIN = 256, 64  # csrc/zo_cpu.cpp: elements per block (64 Philox counters), blocks per parallel task
N, OFFSET = 5 * GRAIN * BLOCK + 777, 3  # 324 blocks: 6 tasks, the last one partial; an offset inside a counter


def tasks(n: int, offset: int) -> int:
    """Parallel tasks of a pass over n elements starting at ``offset`` in the stream (csrc's fused_pass)."""
    counters = (offset + n + 3) // 4 - offset // 4
    blocks = -(-counters // (BLOCK // 4))
    return -(-blocks // GRAIN)


def master(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 3


def last_threads() -> int:
    return require_cpp().last_pass_threads()


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 8])
def test_a_bounded_pass_runs_on_exactly_the_threads_it_may_use(threads):
    assert tasks(N, OFFSET) == 6
    expected = min(threads, tasks(N, OFFSET))  # each task on its own thread, never more threads than tasks
    with Z.cpu_threads(threads):
        Z.zo_perturb_(master(), [5, 6], [1e-2, -3e-3], stream=7, c=-1e-4, offset=OFFSET)
        assert last_threads() == expected
        Z.zo_perturb_(master(), [5], [1e-2], stream=7, offset=OFFSET, out=torch.empty(N, dtype=torch.bfloat16))
        assert last_threads() == expected
        Z.cast_into(torch.empty(N, dtype=torch.float16), master())
        assert last_threads() == min(threads, tasks(N, 0))  # the cast's blocks: 256 elements from element 0
        Z.zo_perturb_(torch.randn(1000), [5], [1e-2])
        assert last_threads() == 1  # one task: run inline, whatever the bound


def test_unbounded_passes_use_torchs_threads_and_the_bound_is_the_calling_threads_alone():
    Z.zo_perturb_(master(), [5], [1e-2], stream=7, offset=OFFSET)
    assert 1 <= last_threads() <= min(torch.get_num_threads(), tasks(N, OFFSET))
    seen = {}

    def other() -> None:  # runs while the main thread's bound is 1: not bounded by it
        Z.zo_perturb_(master(), [5], [1e-2], stream=7, offset=OFFSET)
        seen["bound"], seen["threads"] = Z.current_cpu_threads(), last_threads()

    with Z.cpu_threads(1):
        with Z.cpu_threads(3):
            assert Z.current_cpu_threads() == 3
        assert Z.current_cpu_threads() == 1  # restored on exit
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    assert Z.current_cpu_threads() is None
    assert seen["bound"] is None and seen["threads"] == last_threads_unbounded()


def last_threads_unbounded() -> int:
    Z.zo_perturb_(master(), [5], [1e-2], stream=7, offset=OFFSET)
    return last_threads()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_results_are_the_same_bits_for_every_thread_bound(dtype):
    """Update, update + cast, and cast alone, at bounds 1, 2, 3, 5, 8 and unbounded: the same bits as
    each other, as the torch twin's update followed by torch's cast, and as torch's cast alone."""
    seeds, coefs, stream, c = [5, 6], [1e-2, -3e-3], 7, -1e-4
    twin = master()
    Z._zo_perturb_torch(twin, seeds, coefs, stream, c, Z.dist_code("normal"), OFFSET)
    specials = master(1)
    specials[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 65520.0, -7e4])
    specials[8:12] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11])  # bf16 / fp16 ties
    for threads in (None, 1, 2, 3, 5, 8):
        with Z.cpu_threads(threads):
            p = master()
            Z.zo_perturb_(p, seeds, coefs, stream, c, offset=OFFSET)
            assert torch.equal(p, twin), threads
            p, wire = master(), torch.empty(N, dtype=dtype)
            Z.zo_perturb_(p, seeds, coefs, stream, c, offset=OFFSET, out=wire)
            assert torch.equal(p, twin) and torch.equal(wire, twin.to(dtype)), threads
            out = torch.full((N,), 7.0, dtype=dtype)
            Z.cast_into(out, specials)
            expected = specials.to(dtype)
            nan = expected.isnan()
            assert torch.equal(out.isnan(), nan), threads
            # every other bit pattern (-0, infinities, subnormals, ties) exactly; a NaN's payload is the
            # kernel's (0x7FC0 for bf16, as the fused pass writes; torch's vector cast writes 0xFFFF)
            assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), threads


def test_bad_bounds_and_casts_are_refused():
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="threads must be an int >= 1 or None"):
            with Z.cpu_threads(bad):
                pass
    with pytest.raises(RuntimeError, match="num_threads must be >= 0"):
        require_cpp().zo_axpbz_(torch.zeros(4), [1], [1.0], 0, 0.0, 0, 0, -1)
    with pytest.raises(ValueError, match="cast_into: out has 3 elements"):
        Z.cast_into(torch.empty(3, dtype=torch.bfloat16), torch.zeros(4))
    with pytest.raises(ValueError, match="cast_into: the cast's source"):
        Z.cast_into(torch.empty(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float64))
