"""Kernel micro-benchmarks, one ``bench_<op>.py`` per kernel in ``kernels/<op>.py``.

Run one as ``memtrain-bench kernels <op> [ARGS ...]`` or ``python -m memtrain.bench.kernels.bench_<op>``;
``memtrain-bench kernels`` lists them.
"""
