"""`python -m worker QUEUE [--burst]`: one worker process for a queue, built by `create_worker` directly (what
`salesdash worker` and `salesdash up` start; `arq worker.QUEUE.Settings` runs the same worker)."""

from __future__ import annotations

import importlib
import logging.config
import sys

from arq.logs import default_log_config

from worker.engine import create_worker
from worker.registry import Queue


def main(argv: list[str]) -> int:
    names = [q.value for q in Queue]
    if not argv or argv[0] not in names:
        sys.stderr.write(f"usage: python -m worker {{{','.join(names)}}} [--burst]\n")
        return 2
    settings = importlib.import_module(f"worker.{argv[0]}").Settings
    logging.config.dictConfig(default_log_config(verbose=False))
    create_worker(settings, burst="--burst" in argv[1:]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
