"""`salesdash events` (alias `top`): a live terminal view of queues, workers and running jobs, like `celery events`.

A snapshot is read from Redis (the worker registry and each queue's keys, through worker.client and
worker.jobstore) every `--interval` seconds and drawn with rich; `q` quits (Ctrl-C too). Without a terminal on
stdin there is no key to read: it runs until a signal, or prints one frame with `--once`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from redis.asyncio import Redis
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker import client
from worker import jobstore as js
from worker.records import JobStatus, WorkerInfo

QUIT_KEYS = frozenset("qQ")


@dataclass(frozen=True)
class QueueRow:
    queue: str
    queued: int
    deferred: int
    in_progress: int
    workers: int
    oldest_wait_s: float | None  # the longest-waiting due job's wait; None when nothing waits


@dataclass(frozen=True)
class Snapshot:
    taken_ms: int
    queues: list[QueueRow]
    workers: list[WorkerInfo]
    running: list[JobStatus]  # what the live workers say they run, on any queue


async def take_snapshot(redis: Redis) -> Snapshot:
    now = js.now_ms()
    waits = await client.oldest_waits(redis)
    queues = [
        QueueRow(name, c["queued"], c["deferred"], c["in_progress"], c["workers"], waits[name])
        for name, c in (await client.queue_overview(redis)).items()
    ]
    workers = sorted(await client.workers(redis), key=lambda w: (w.queue, w.host, w.pid))
    running = []
    for worker in workers:
        for job_id in worker.running:
            status = await js.live_status(redis, job_id, [worker.queue])
            if status is not None and status.status == "in_progress":
                running.append(status)
    return Snapshot(now, queues, workers, running)


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 120:
        return f"{value:.1f}s"
    return f"{value / 60:.0f}m" if value < 7200 else f"{value / 3600:.1f}h"


def _queues_table(snap: Snapshot) -> Table:
    table = Table(title="queues", title_justify="left", expand=True)
    for column in ("queue", "queued", "deferred", "running", "workers", "oldest waiting"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for row in snap.queues:
        workers = Text(str(row.workers), style="red" if row.workers == 0 else "")
        table.add_row(
            row.queue, str(row.queued), str(row.deferred), str(row.in_progress), workers, _seconds(row.oldest_wait_s)
        )
    return table


def _workers_table(snap: Snapshot) -> Table:
    table = Table(title=f"workers ({len(snap.workers)} alive)", title_justify="left", expand=True)
    for column in ("worker", "queue", "host", "pid", "running", "complete", "failed", "retried", "seen"):
        table.add_column(
            column, justify="left" if column in ("worker", "queue", "host") else "right", no_wrap=column == "worker"
        )
    for w in snap.workers:
        table.add_row(
            w.worker_id,
            w.queue,
            w.host,
            str(w.pid),
            f"{len(w.running)}/{w.max_jobs}",
            str(w.jobs_complete),
            str(w.jobs_failed),
            str(w.jobs_retried),
            f"{_seconds((snap.taken_ms - w.seen_ms) / 1000)} ago",
        )
    return table


def _running_table(snap: Snapshot) -> Table:
    table = Table(title=f"running jobs ({len(snap.running)})", title_justify="left", expand=True)
    for column in ("job", "task", "queue", "worker", "try", "age", "progress"):
        # ids are what an operator copies into `salesdash result`: never folded
        table.add_column(column, justify="right" if column in ("try", "age") else "left", no_wrap=column == "job")
    now = datetime.fromtimestamp(snap.taken_ms / 1000, UTC)
    for job in sorted(snap.running, key=lambda j: (j.queue, j.task_id)):
        since = job.started_at or job.enqueued_at  # live jobs carry no start time: age since enqueued
        progress = f"{job.progress.fraction:.0%} {job.progress.message}" if job.progress else ""
        table.add_row(
            job.task_id,
            job.task_name,
            job.queue,
            job.worker_id or "",
            str(job.tries),
            _seconds((now - since).total_seconds()) if since else "",
            progress,
        )
    return table


def render(snap: Snapshot) -> RenderableType:
    """One frame: a header line, then queues, workers and running jobs."""
    taken = datetime.fromtimestamp(snap.taken_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = Text.assemble(("salesdash events", "bold"), f"  {taken}  ", ("q", "bold"), " quits")
    return Group(header, _queues_table(snap), _workers_table(snap), _running_table(snap))


@contextlib.contextmanager
def quit_on_key(stream: TextIO, quit: asyncio.Event) -> Iterator[bool]:
    """Set `quit` when q is typed on `stream` (a terminal, put in cbreak mode meanwhile and restored after).
    Yields whether keys are read at all (not when `stream` is not a terminal)."""
    if not stream.isatty():
        yield False
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_input() -> None:
        if QUIT_KEYS & set(os.read(fd, 64).decode(errors="replace")):
            quit.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_input)
    try:
        yield True
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def watch(redis: Redis, console: Console, interval: float) -> None:
    """Redraw every `interval` seconds until q (or a signal)."""
    from rich.live import Live

    quit = asyncio.Event()
    with (
        quit_on_key(sys.stdin, quit) as interactive,
        Live(console=console, screen=interactive, auto_refresh=False) as live,
    ):
        while not quit.is_set():
            live.update(render(await take_snapshot(redis)), refresh=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit.wait(), interval)
