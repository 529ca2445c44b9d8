"""``python -m bench`` from the checkout's root (installed: ``memtrain-bench``)."""

from .cli import main

main()
