"""``python -m vq_draw``: the ``vq-draw`` command line."""

from .cli import main

main()
