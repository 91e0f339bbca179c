"""`salesdash worker <queue> --processes N ...` (salesdash/supervisor.py) with real processes: the supervisor
runs as a subprocess of the test, its children are real arq workers on the test Redis/PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from redis.asyncio import Redis

from salesdash.supervisor import MAX_JOBS_ENV, backoff_s, child_env
from tests.conftest import ROOT, wait_for
from worker import jobstore

SHUTDOWN_TIMEOUT_S = 2


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def child_pids(supervisor: subprocess.Popen[bytes]) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(supervisor.pid).children() if alive(c.pid)}
    except psutil.NoSuchProcess:
        return set()


class Run:
    """One supervisor subprocess, its log, and every child pid seen (killed at teardown if still there)."""

    def __init__(self, log: Path, args: tuple[str, ...]) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "salesdash.cli", "worker", "analytics", *args], cwd=ROOT,
                env={**os.environ, "SALESDASH_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)},
                stdout=out, stderr=subprocess.STDOUT)
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> set[int]:
        pids = child_pids(self.proc)
        self.seen |= pids
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    async def wait_children(self, predicate: Callable[[set[int]], bool], timeout: float = 20) -> set[int]:
        async def check() -> set[int] | None:
            assert self.proc.poll() is None, f"supervisor exited {self.proc.returncode}:\n{self.log()}"
            pids = self.children()
            return pids if predicate(pids) else None

        try:
            result: set[int] = await wait_for(check, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; children now {self.children()}\n{self.log()}") from None
        return result

    def cleanup(self) -> None:
        self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S + 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


Start = Callable[..., Run]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Start]:
    runs: list[Run] = []

    def start(*args: str) -> Run:
        run = Run(tmp_path / f"supervisor-{len(runs)}.log", args)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


async def registered_pids(redis: Redis) -> set[int]:
    """Pids of the analytics workers in the engine's registry."""
    pids = set()
    for worker_id in await redis.zrange(jobstore.WORKERS_KEY, 0, -1):
        info = await redis.hgetall(  # type: ignore[misc]
            f"{jobstore.WORKERS_KEY}:{worker_id.decode()}")
        if info.get(b"queue") == b"analytics":
            pids.add(int(info[b"pid"]))
    return pids


async def job_states(redis: Redis, ids: list[str]) -> dict[str, str]:
    """Where each unfinished job is, for failure messages."""
    keys = jobstore.QueueKeys.of("analytics")
    states = {}
    for job_id in ids:
        if await redis.exists(jobstore.result_key(job_id)):
            continue
        where = [name for name, key in (("ready", keys.ready), ("running", keys.running),
                                        ("deferred", keys.deferred)) if await redis.zscore(key, job_id) is not None]
        payload = await redis.exists(jobstore.job_key(job_id))
        states[job_id] = f"in {where or 'no queue set'}, payload {'present' if payload else 'gone'}"
    return states


async def wait_registered(redis: Redis, run: Run, count: int) -> set[int]:
    async def check() -> set[int] | None:
        children = run.children()
        pids = await registered_pids(redis)
        return children if len(children) == count and pids >= children else None

    try:
        result: set[int] = await wait_for(check, timeout=20)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; registry {await registered_pids(redis)}\n{run.log()}") from None
    return result


# ---- pure helpers -----------------------------------------------------------------------------------------
def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_child_env_sets_or_clears_the_job_limit() -> None:
    assert child_env(3, {"A": "1"}) == {"A": "1", MAX_JOBS_ENV: "3"}
    assert child_env(0, {"A": "1", MAX_JOBS_ENV: "7"}) == {"A": "1"}


# ---- real processes ---------------------------------------------------------------------------------------
async def test_runs_the_requested_number_of_workers(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2")
    pids = await wait_registered(clean_redis, run, 2)
    assert len(pids) == 2
    for pid in pids:
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[1:] == ["-m", "arq", "worker.analytics.Settings"], cmdline
        assert psutil.Process(pid).environ().get(MAX_JOBS_ENV) is None


async def test_recycles_children_after_n_jobs(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2", "--max-tasks-per-child", "3")
    first = await wait_registered(clean_redis, run, 2)
    assert all(psutil.Process(pid).environ().get(MAX_JOBS_ENV) == "3" for pid in first)
    jobs = [await jobstore.enqueue_raw(clean_redis, task_name="refresh_realtime_materialized_views",
                                       queue="analytics", kwargs={}) for _ in range(10)]
    ids = [job.job_id for job in jobs if job is not None]
    assert len(ids) == 10

    async def all_done() -> list[dict[str, object]] | None:
        raw = await clean_redis.mget([jobstore.result_key(i) for i in ids])
        return [json.loads(r) for r in raw] if all(raw) else None

    try:
        records = await wait_for(all_done, timeout=40, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all jobs finished: {await job_states(clean_redis, ids)}\n{run.log()}") from None
    assert {r["status"] for r in records} == {"complete"}, records
    per_worker = Counter(str(r["worker_id"]) for r in records)
    pids = {int(w.split(":")[1]) for w in per_worker}
    assert len(pids) >= 4, per_worker  # 10 jobs, at most 3 per process
    assert max(per_worker.values()) <= 3, f"a process ran more than --max-tasks-per-child jobs: {per_worker}"
    await run.wait_children(lambda now: len(now) == 2)  # capacity is back
    assert "recycled after 3 jobs" in run.log()


async def test_replaces_a_child_above_the_memory_limit(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "1", "--max-memory-per-child", "1")
    (old,) = await run.wait_children(lambda now: len(now) == 1)
    await run.wait_children(lambda now: len(now) >= 1 and old not in now)
    assert not alive(old)
    assert run.proc.poll() is None
    assert "child above memory limit" in run.log()


async def test_restarts_a_killed_child(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2")
    pids = await run.wait_children(lambda now: len(now) == 2)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    now = await run.wait_children(lambda now: len(now) == 2 and victim not in now)
    assert now - pids, now
    assert "crashed" in run.log()


async def test_sigterm_stops_everything(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2")
    pids = await wait_registered(clean_redis, run, 2)
    started = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(SHUTDOWN_TIMEOUT_S + 12) == 0, run.log()
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + 10
    assert not any(alive(pid) for pid in run.seen | pids), run.log()
    assert await registered_pids(clean_redis) == set()  # workers deregistered on their way out


async def test_children_die_with_a_killed_supervisor(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2")
    pids = await run.wait_children(lambda now: len(now) == 2)
    run.proc.kill()
    run.proc.wait()

    async def gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await wait_for(gone, timeout=SHUTDOWN_TIMEOUT_S + 10)
