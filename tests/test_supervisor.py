"""`salesdash worker <queue> --processes N ...` (salesdash/supervisor.py) with real processes: the supervisor
runs as a subprocess of the test, its children are real arq workers on the test Redis/PostgreSQL."""

from __future__ import annotations

import logging
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

import cli.supervisor as supervisor_module
from cli.supervisor import MAX_JOBS_ENV, Supervisor, backoff_s, child_env
from tests.conftest import ROOT, enqueue_job, wait_for
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
                [sys.executable, "-m", "cli", "worker", "analytics", *args],
                cwd=ROOT,
                env={**os.environ, "SALESDASH_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
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
    return {w.pid for w in await jobstore.live_workers(redis) if w.queue == "analytics"}


async def job_states(redis: Redis, ids: list[str]) -> dict[str, str]:
    """Where each unfinished job is, for failure messages."""
    keys = jobstore.QueueKeys("analytics")
    states = {}
    for job_id in ids:
        if await redis.exists(jobstore.result_key(job_id)):
            continue
        where = [
            name
            for name, key in (("ready", keys.ready), ("running", keys.running), ("schedule", keys.schedule))
            if await redis.zscore(key, job_id) is not None
        ]
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


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_crashing_children_back_off(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor(_python("raise SystemExit(3)"), dict(os.environ), processes=1)
    caplog.set_level(logging.INFO, "salesdash.supervisor")
    deadline = time.monotonic() + 2.5
    try:
        while time.monotonic() < deadline:
            sup.step()
            time.sleep(0.05)
    finally:
        sup.stop()
    starts = [r for r in caplog.records if r.getMessage() == "child started"]
    crashes = [r for r in caplog.records if getattr(r, "reason", None) == "crashed"]
    # at once, then after 1 s, then 2 s: three or four starts in 2.5 s, not dozens
    assert 2 <= len(starts) <= 4, [r.__dict__.get("pid") for r in starts]
    assert crashes and all(getattr(r, "code", None) == 3 for r in crashes)
    assert sup.slots[0].crashes >= 2


def test_stop_kills_a_child_that_ignores_sigterm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(supervisor_module, "KILL_AFTER_EXTRA_S", 0.5)
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    sup = Supervisor(_python(code), dict(os.environ), processes=1, shutdown_timeout_s=0)
    sup.step()
    child = sup.slots[0].child
    assert child is not None
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started < 3
    assert child.proc.returncode == -signal.SIGKILL
    assert not sup.retiring


# ---- real processes ---------------------------------------------------------------------------------------
async def test_runs_the_requested_number_of_workers(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2")
    pids = await wait_registered(clean_redis, run, 2)
    assert len(pids) == 2
    for pid in pids:
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[1:] == ["-m", "worker", "analytics"], cmdline  # our engine, built without arq's CLI
        assert psutil.Process(pid).environ().get(MAX_JOBS_ENV) is None


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


async def test_recycles_children_after_n_jobs(supervisor: Start, clean_redis: Redis) -> None:
    run = supervisor("--processes", "2", "--max-tasks-per-child", "3")
    first = await wait_registered(clean_redis, run, 2)
    assert all(psutil.Process(pid).environ().get(MAX_JOBS_ENV) == "3" for pid in first)
    # an unscheduled task: a scheduled one (refresh_realtime_…) keeps its result 1 s, not 24 h (the worker's
    # functions map holds its CronJob, keep_result_s=0), so the records would expire while we wait
    ids = [await enqueue_job(clean_redis, "refresh_all_materialized_views", "analytics") for _ in range(10)]

    async def all_done() -> list[dict[str, object]] | None:
        raw = await clean_redis.mget([jobstore.result_key(i) for i in ids])
        if not all(raw):
            return None
        return [{"status": r.status, "worker_id": r.worker_id} for r in map(jobstore.decode_record, raw)]

    try:
        records = await wait_for(all_done, timeout=40, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not all jobs finished: {await job_states(clean_redis, ids)}\n{run.log()}") from None
    assert {r["status"] for r in records} == {"complete"}, records
    per_worker = Counter(str(r["worker_id"]) for r in records)  # worker_id is host:pid:random
    assert len({w.split(":")[1] for w in per_worker}) > 1, per_worker
    assert max(per_worker.values()) <= 3, f"a process ran more than --max-tasks-per-child jobs: {per_worker}"
    assert len(per_worker) >= 4, per_worker  # 10 jobs, at most 3 per process
    # 3 + 3 + 3 + 1: at least three processes reached the limit and exited; two children run again
    await run.wait_children(lambda now: len(now) == 2 and run.log().count("recycled after 3 jobs") >= 3)
