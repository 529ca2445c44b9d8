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
