"""`salesdash events` / `top`: the frame it draws, and the real command on a terminal (a pty) quitting on q."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Any

from redis.asyncio import Redis
from rich.console import Console

from cli.events import QueueRow, Snapshot, render, take_snapshot
from tests.conftest import ROOT, enqueue_job, wait_for
from worker import jobstore
from worker.records import JobStatus, Progress, WorkerInfo, ms_to_dt

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>78]")


def _text(snap: Snapshot) -> str:
    console = Console(file=io.StringIO(), width=220, record=True)
    console.print(render(snap))
    return console.export_text()


def test_the_frame_shows_queues_workers_and_running_jobs() -> None:
    now = jobstore.now_ms()
    worker = WorkerInfo(
        worker_id="host-a:4242:abcdef",
        queue="analytics",
        host="host-a",
        pid=4242,
        functions=["refresh_all_materialized_views"],
        running=["job-1"],
        jobs_complete=17,
        jobs_failed=2,
        jobs_retried=1,
        max_jobs=20,
        seen_ms=now - 3000,
    )
    job = JobStatus(
        task_id="job-1",
        task_name="refresh_all_materialized_views",
        queue="analytics",
        status="in_progress",
        tries=2,
        enqueued_at=ms_to_dt(now - 90_000),
        progress=Progress(fraction=0.25, message="daily rollups"),
        worker_id=worker.worker_id,
    )
    queues = [QueueRow("analytics", 3, 1, 1, 1, 42.0), QueueRow("maintenance", 0, 0, 0, 0, None)]
    text = _text(Snapshot(now, queues, [worker], [job]))
    lines = text.splitlines()
    analytics = next(line for line in lines if line.startswith("│ analytics"))
    assert re.search(r"│\s+3 │\s+1 │\s+1 │\s+1 │\s+42\.0s │", analytics), analytics
    cells = r"\s*│\s*".join(["host-a:4242:abcdef", "analytics", "host-a", "4242", "1/20", "17", "2", "1", r"3\.0s ago"])
    assert re.search(cells, text), text
    running = next(line for line in lines if "job-1" in line)
    assert "refresh_all_materialized_views" in running and "25% daily rollups" in running and "90.0s" in running
    assert "workers (1 alive)" in text and "running jobs (1)" in text


async def test_snapshot_reads_what_live_workers_run(clean_redis: Redis, spawn_worker: Any) -> None:
    spawn_worker("tests.platform_worker.Settings")
    job_id = await enqueue_job(clean_redis, "halfway", "platform", {"release_key": "test:release"})
    try:
        snap = await wait_for(lambda: _running(clean_redis, job_id), timeout=30)
        job = next(j for j in snap.running if j.task_id == job_id)
        assert job.task_name == "halfway" and job.progress is not None and job.progress.message == "half way"
        assert any(w.queue == "platform" and job_id in w.running for w in snap.workers)
        assert [q.queue for q in snap.queues] == ["analytics", "maintenance", "notifications"]
        text = _pty_session(job_id)
        row = next(line for line in text.splitlines() if job_id in line)
        assert "halfway" in row and "platform" in row and "50% half way" in row, row
    finally:
        await clean_redis.set("test:release", "1")


async def _running(redis: Redis, job_id: str) -> Snapshot | None:
    snap = await take_snapshot(redis)
    job = next((j for j in snap.running if j.task_id == job_id), None)
    return (
        snap
        if job is not None and job.progress is not None and any(job_id in w.running for w in snap.workers)
        else None
    )


def _pty_session(job_id: str) -> str:
    """Run `salesdash top` on a pseudo-terminal, wait for a frame with the running job, press q: it must quit."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "top", "--interval", "0.3"],
        cwd=ROOT,
        env={**os.environ, "TERM": "xterm-256color"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        row = re.compile(re.escape(job_id.encode()) + rb"[^\n]*\n")  # the job's whole row
        while not row.search(ANSI.sub(b"", seen)) and time.monotonic() < deadline:
            seen += _read(master, 0.5)
        text = ANSI.sub(b"", seen).decode(errors="replace")
        titles = set(re.findall(r"(?:running jobs|workers) \(\d+[^)]*\)", text))
        assert "running jobs (1)" in text, f"no frame with the running job, only {titles}"
        os.write(master, b"q")
        quit_by = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < quit_by:
            _read(master, 0.2)  # keep reading: a full pty would block the frame it is drawing
        assert proc.returncode == 0, "q did not quit"
        return text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _read(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
