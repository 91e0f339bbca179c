"""Bench Celery 5 app: `celery -A bench._queue_celery worker -P prefork -c 2 -Q benchq ...` (bench/queue.py
starts it). Redis broker and Redis result backend on separate databases, so the bench can count finished
tasks with DBSIZE on the result database."""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "benchq"
BROKER_URL = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/12")
BACKEND_URL = os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/13")


def make_app(*, result_backend: bool = True) -> Celery:
    """The worker's app has the result backend; the bench enqueues 10,000 jobs through an app without one, so
    its client does not subscribe to 10,000 result channels (the worker still stores every result)."""
    app = Celery("bench", broker=BROKER_URL, backend=BACKEND_URL if result_backend else None)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        worker_hijack_root_logger=True,
    )
    return app


app = make_app()


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="ping")
def ping() -> None:
    return None
