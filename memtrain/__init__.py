"""memtrain: memory-efficient LLM training (zo2: zeroth-order + offloading; flashdp: fused DP-SGD).

The umbrella holds only shared infrastructure: the version, the C++ extension loader
(:mod:`memtrain._cpp`), the environment report (``python -m memtrain.env_report``) and test helpers.
Importing it is cheap: no CUDA initialisation, no kernel compilation.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memtrain")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]


def _map_checkout_subpackages() -> None:
    """Run from a source checkout's root (its folder first on ``sys.path``), this file is the checkout's, and
    ``memtrain.kernels``, ``memtrain.bench`` and ``memtrain.csrc`` live beside it (pyproject's package-dir
    maps them): put the checkout's root on ``__path__`` so they resolve there, as they do once installed."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return  # an installed copy: the subpackages are folders of this package
    if all(os.path.isfile(os.path.join(root, sub, "__init__.py")) for sub in ("kernels", "bench")):
        __path__.append(root)  # type: ignore[name-defined]


_map_checkout_subpackages()
