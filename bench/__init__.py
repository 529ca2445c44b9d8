"""memtrain's benchmarks, installed as ``memtrain.bench``: run ``memtrain-bench`` or ``python -m memtrain.bench``.

Subcommands ``zo``, ``dp``, ``plan`` and ``kernels``; see :mod:`memtrain.bench.cli`. Measured tables are in
bench/RESULTS.md. Importing the package loads neither torch nor transformers.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the command line (imported lazily)."""
    from .cli import main as cli_main

    cli_main(argv)
