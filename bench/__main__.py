"""``python -m memtrain.bench`` (the same as the installed ``memtrain-bench``)."""


def _run() -> None:
    if __package__ != "memtrain.bench":  # `python -m bench` from the checkout would load a second copy as `bench`
        raise SystemExit("run the benchmarks as `memtrain-bench ...` or `python -m memtrain.bench ...` after "
                         "`pip install --no-build-isolation -e .` (the bench/ folder is installed as memtrain.bench)")
    from .cli import main

    main()


_run()
