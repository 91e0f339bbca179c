"""docs/operations.md's "Coming from Celery" table: read from the markdown, every command in it run for real.

Worker commands run until stopped: each must bring up a worker of its queue (seen in the worker registry) and exit
0 on SIGTERM. The others must exit 0 and print something. `TASK_ID` is replaced by the id of a job that ran."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import ROOT, wait_for
from worker import client

GUIDE = ROOT / "docs" / "operations.md"
SERVES = re.compile(r"^(?:[A-Z_]+=\S+ )*salesdash worker (\w+)\b")
# every command and setting of the old Celery guide that issue 11 lists must have its row
CELERY_ITEMS = (
    "worker -Q",
    "beat",
    "flower",
    "inspect active`",
    "inspect scheduled",
    "inspect registered",
    "inspect stats",
    "inspect active_queues",
    " call ",
    "purge",
    "priority",
    "max-tasks-per-child",
    "max-memory-per-child",
    "time_limit",
    "result_expires",
    "shutdown",
    "countdown",
    "AsyncResult",
)


def celery_table() -> list[tuple[str, str]]:
    """(Celery cell, command) for each row of the table under "## Coming from Celery"."""
    section = GUIDE.read_text().split("## Coming from Celery", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or cells[0] in ("Celery", "---") or set(cells[0]) <= {"-", "|"}:
            continue
        command = re.fullmatch(r"`([^`]+)`", cells[2])
        assert command, f"the command cell of {cells[0]!r} must be one `command`, got {cells[2]!r}"
        rows.append((cells[0], command.group(1)))
    return rows


def test_the_table_maps_every_celery_item() -> None:
    celery_cells = " ".join(celery for celery, _ in celery_table())
    missing = [item for item in CELERY_ITEMS if item not in celery_cells]
    assert not missing, f"no row for {missing}"


ASSIGNMENTS = re.compile(r"^((?:[A-Z_]+=\S+ )*)(.*)$")
AT_ONCE = 4  # commands run side by side: each spends most of its time starting Python


def _prepared(command: str) -> tuple[list[str], dict[str, str]]:
    """argv for bash (the command exec'd, so a signal reaches it) and the environment with its assignments."""
    match = ASSIGNMENTS.match(command)
    assert match is not None
    assignments = dict(a.split("=", 1) for a in match.group(1).split())
    bin_dir = str(Path(sys.executable).parent)  # the venv's `salesdash`
    env = {**os.environ, **assignments, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return ["bash", "-c", f"exec {match.group(2)}"], env


async def _run_to_completion(command: str, slots: asyncio.Semaphore) -> str:
    argv, env = _prepared(command)
    async with slots:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}: {err.decode()[-2000:]}"
    assert out.strip(), f"`{command}` printed nothing"
    return out.decode()


async def _run_worker(command: str, queue: str, redis: Redis, log: Path) -> None:
    """Start a worker command, wait until one of its own worker processes is registered, SIGTERM it: exit 0."""
    argv, env = _prepared(command)
    with log.open("wb") as out:  # a file: a chatty supervisor never blocks on a full pipe
        proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        async def started() -> bool:
            try:
                children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                return False
            return any(w.queue == queue and w.pid in children for w in await client.workers(redis))

        try:
            await wait_for(started, timeout=90, interval=0.2)
        except AssertionError:
            raise AssertionError(f"`{command}` brought up no {queue} worker: {log.read_text()[-3000:]}") from None
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=60)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode} on SIGTERM: {log.read_text()[-3000:]}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_every_command_in_the_celery_table_works(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any, tmp_path: Path
) -> None:
    spawn_worker("worker.analytics.Settings")  # for `call --wait`
    job = await client.enqueue_task(clean_redis, OPERATOR, "refresh_realtime_materialized_views")

    async def finished() -> bool:
        return (await client.job_status(clean_redis, db, job.task_id)).status == "complete"

    await wait_for(finished, timeout=60)
    slots = asyncio.Semaphore(AT_ONCE)

    async def check(index: int, template: str) -> None:
        command = template.replace("TASK_ID", job.task_id)
        serves = SERVES.match(command)
        if serves:
            await _run_worker(command, serves.group(1), clean_redis, tmp_path / f"row-{index}.log")
            return
        printed = await _run_to_completion(command, slots)
        if "TASK_ID" in template:
            assert job.task_id in printed and "complete" in printed, printed

    # every command runs to its end (and its processes are gone) before a failure is reported
    outcomes = await asyncio.gather(*(check(i, c) for i, (_, c) in enumerate(celery_table())), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        raise failures[0]
