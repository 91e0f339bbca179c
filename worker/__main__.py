"""`python -m worker QUEUE|SETTINGS_PATH [--burst]`: one worker process, built by `create_worker` directly (what
`salesdash worker` and `salesdash up` start; `arq worker.QUEUE.Settings` runs the same worker through arq's CLI)."""

from __future__ import annotations

import logging.config
import sys

from arq.logs import default_log_config
from arq.utils import import_string

from worker.engine import create_worker
from worker.registry import Queue

_USAGE = f"usage: python -m worker {{{','.join(q.value for q in Queue)}}}|module.Settings [--burst]\n"


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        sys.stderr.write(_USAGE)
        return 2
    target = argv[0] if "." in argv[0] else f"worker.{argv[0]}.Settings"
    try:
        settings = import_string(target)
    except ImportError as exc:
        sys.stderr.write(f"{exc}\n{_USAGE}")
        return 2
    logging.config.dictConfig(default_log_config(verbose=False))
    create_worker(settings, burst="--burst" in argv[1:]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
