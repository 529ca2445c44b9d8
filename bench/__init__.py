"""memtrain's benchmarks: ``python -m bench`` (installed as the ``memtrain-bench`` console script).

Subcommands ``zo``, ``dp`` and ``plan``; see :mod:`bench.cli`. Kernel micro-benchmarks are in
``tests/bench/test_kernel_benchmarks.py`` (``pytest -m benchmark``), measured tables in RESULTS.md.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the command line (imported lazily: importing the package loads neither torch nor transformers)."""
    from .cli import main as cli_main

    cli_main(argv)
