"""memtrain.kernels: one module per operation (Triton kernel, launcher, C++/torch twins, dispatcher).

Installed as ``memtrain.kernels`` (never as a top-level ``kernels``, a name PyPI already uses). Import
the operation's module directly, e.g. ``from memtrain.kernels.zo_perturb import zo_perturb_``;
nothing here imports Triton or touches a device.

When the checkout's root is on ``sys.path`` (``python -m ...`` or ``python -c`` run from the root), an
``import kernels`` would find this folder first and shadow Hugging Face's ``kernels`` package, which
transformers imports. Run under that name, this file loads the installed ``kernels`` from the rest of
``sys.path`` in its place (``sys.modules["kernels"]`` becomes it), or raises ModuleNotFoundError as if
the folder were not there, so nothing of this folder is ever importable as top-level ``kernels``.
"""

if __name__ == "kernels":
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    def _installed_elsewhere(name: str, folder: str) -> None:
        """Replace this module in ``sys.modules`` by ``name`` found on ``sys.path`` without ``folder``'s parent."""
        root = _os.path.realpath(_os.path.dirname(folder))
        path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]
        spec = _PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                f"No module named {name!r}: the folder {folder} is memtrain's own kernels, importable only as "
                f"memtrain.kernels (install Hugging Face's `kernels` package if you need {name!r})", name=name)
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module  # the import system returns what sys.modules holds after this file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules[name]
            raise

    _installed_elsewhere(__name__, _os.path.dirname(_os.path.abspath(__file__)))
else:
    __all__: list[str] = []
