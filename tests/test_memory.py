"""memtrain.memory against the kernel's own accounting (/proc), read independently."""

import os

import pytest
import torch

from memtrain import memory

MiB = 2**20
# Linux batches each thread's RSS counter updates (up to 64 page events per thread before they reach the
# process counters), so two readings of the same level can differ by a few hundred KiB: allow 1 MiB.
SLACK = MiB
LINUX = os.path.exists("/proc/self/statm")


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


@pytest.mark.skipif(not LINUX, reason="needs /proc")
def test_rss_matches_statm():
    # two reads a few microseconds apart: only the interpreter's own small allocations come between them
    before, rss, after = _statm_rss(), memory.rss_bytes(), _statm_rss()
    assert min(before, after) - SLACK <= rss <= max(before, after) + SLACK


@pytest.mark.skipif(not LINUX, reason="needs /proc/meminfo")
def test_available_host_bytes_is_memavailable():
    # other processes change MemAvailable at any time: the reading must lie between two kernel readings taken
    # around it (retried, since memory can also go up and down between them)
    for _ in range(10):
        lo, got, hi = _meminfo_available(), memory.available_host_bytes(), _meminfo_available()
        if min(lo, hi) <= got <= max(lo, hi):
            return
    pytest.fail(f"available_host_bytes() = {got} is not MemAvailable (read {lo} and {hi} around it)")


@pytest.mark.skipif(not memory.peak_rss_resettable(), reason="the RSS peak cannot be reset here")
def test_peak_rss_reset_forgets_an_earlier_peak():
    n = 256 * MiB // 4
    memory.reset_peak_rss()
    x = torch.ones(n)  # touched: resident
    high = memory.peak_rss_bytes()
    assert high >= memory.rss_bytes() - SLACK and high >= 256 * MiB  # the peak is at least the present level
    del x
    memory.release_freed_memory()
    assert memory.peak_rss_bytes() >= high - SLACK  # freeing does not lower the high-water mark
    assert memory.reset_peak_rss()
    # now the high-water mark is the present level again, which no longer holds the 256 MiB
    assert memory.peak_rss_bytes() < high - 128 * MiB


def test_peak_meter_measures_a_window_on_the_host():
    meter = memory.PeakMeter("cpu")
    assert meter.kind == "rss" and "rss_peak_bytes" in meter.counters()
    if meter.note:
        pytest.skip(meter.note)
    meter.reset()
    start = meter.current()
    x = torch.ones(128 * MiB // 4)
    assert meter.peak() - start >= 120 * MiB
    del x
    meter.reset()
    assert meter.peak() - start < 64 * MiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_meter_on_cuda_counts_allocations():
    meter = memory.PeakMeter("cuda")
    meter.reset()
    start = meter.current()
    x = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    assert meter.peak() - start >= 64 * MiB and meter.current() - start >= 64 * MiB
    del x
    meter.reset()
    assert meter.peak() - start < MiB
