"""Chaos run: jobs of mixed kinds flow while workers, Redis and PostgreSQL are killed and restarted and Sentinel
fails over; then the invariants are checked. One table; exit status 1 if an invariant does not hold.

    .venv/bin/python bench/chaos.py [--jobs 20000] [--seconds 90] [--every 4] [--workers 3] [--drain 240]

Everything is private, in temporary directories: a PostgreSQL 15 cluster (tests/private_servers.py; crashed by
an immediate shutdown), a Redis master with two replicas (AOF, `appendfsync everysec`) under three Sentinels,
and `--workers` worker processes (bench/_chaos_worker.py) reaching Redis through the Sentinel URL. `--jobs` jobs
(70 % fast, 5 % slow 0.2–2 s, 10 % failing by their own fault, 10 % retrying 1–2 transient faults, 5 % reading
PostgreSQL) are enqueued evenly over `--seconds` with the durability setting on (WAIT 1 500 ms), while every `--every`
seconds one fault, in turn: SIGKILL a worker (restarted at once; every other fault), SIGKILL the Redis master and
restart it on its AOF, crash and restart PostgreSQL, SIGKILL the master and let Sentinel fail over (the old one
rejoins as a replica); after each, the bench waits for Redis to settle (one master, replicas in sync). Worker 0
is never killed: its RSS is sampled every 2 s. After the flow, the bench waits for every job to end and its
history to reach PostgreSQL, then for the results to expire, and checks:
- every job accounted for: complete (fast, slow, retrying, db) or failed by its own fault (failing kind);
- none lost: every enqueue acknowledged by a replica is in job_runs;
- duplicates (a job that finished twice, from the runs log the tasks write) only among jobs in flight at a fault;
- job history complete: every job has its final row in job_runs;
- Redis back to its baseline: no per-job key left once results expired, queue structures empty;
- worker RSS flat: the never-killed worker's RSS at the end within 25 % of its RSS 15 s in.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/chaos.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
import psutil  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402
from redis.exceptions import TimeoutError as RedisTimeoutError  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from salesdash.config import Settings  # noqa: E402
from salesdash.connections import open_redis  # noqa: E402
from tests.private_redis import SentinelCluster, sentinel_cluster  # noqa: E402
from tests.private_servers import PrivatePostgres  # noqa: E402
from worker import jobstore  # noqa: E402
from worker.records import JobPayload  # noqa: E402

QUEUE = "chaos"
WORKER_SETTINGS = "bench._chaos_worker.Settings"
REPLICA_WAIT_MS = 500
FINAL = ("complete", "failed", "aborted")
PER_JOB_PREFIXES = ("arq:job:", "arq:result:", "arq:in-progress:", "salesdash:progress:", "salesdash:abort:")


# ---- a private PostgreSQL ----------------------------------------------------------------------------------------
def crash_postgres(pg: PrivatePostgres) -> None:
    """Immediate shutdown (SIGQUIT to the postmaster): no checkpoint, sessions cut, crash recovery at the next start."""
    assert pg.proc is not None
    pg.proc.send_signal(signal.SIGQUIT)
    pg.proc.wait(30)


# ---- workers ---------------------------------------------------------------------------------------------------
@dataclass
class Workers:
    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # exits the bench did not cause, with the log's last line
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(self, index: int) -> subprocess.Popen[bytes]:
        with (self.logs / f"worker-{index}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "arq", WORKER_SETTINGS],
                cwd=_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if index < len(self.procs):
            self.procs[index] = proc
        else:
            self.procs.append(proc)
        return proc

    def kill(self, index: int) -> None:
        with self.lock:  # the supervisor must not take this exit for one of its own and start a second process
            self.procs[index].send_signal(signal.SIGKILL)
            self.procs[index].wait()
            self.spawn(index)

    def revive_exited(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a fault is killing and restarting one right now
        try:
            self._revive_exited()
        finally:
            self.lock.release()

    def _revive_exited(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                lines = (self.logs / f"worker-{i}.log").read_text(errors="replace").strip().splitlines()
                self.exits.append(f"exit {proc.returncode}: {lines[-1][:150] if lines else 'no output'}")
                self.spawn(i)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()


# ---- the flow of jobs ------------------------------------------------------------------------------------------
KINDS = (("fast", 70), ("slow", 5), ("broken", 10), ("flaky", 10), ("dbread", 5))


def make_job(rng: random.Random) -> JobPayload:
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    kwargs: dict[str, Any] = {
        "fast": {"n": rng.randint(0, 1000)},
        "slow": {"seconds": round(rng.uniform(0.2, 2.0), 2)},
        "flaky": {"failures": rng.randint(1, 2)},
    }.get(kind, {})
    now = jobstore.now_ms()
    return JobPayload(jobstore.new_job_id(), kind, [], kwargs, QUEUE, 5, now, now)


@dataclass
class Flow:
    kinds: dict[str, str] = field(default_factory=dict)  # job id -> task
    acked: set[str] = field(default_factory=set)
    unacked: set[str] = field(default_factory=set)  # stored, but no replica acknowledged in time
    retried: int = 0  # enqueue attempts that met a Redis fault and were sent again
    stalls: list[float] = field(default_factory=list)  # longest wait of one enqueue through faults


async def enqueue_one(redis: Redis, job: JobPayload, flow: Flow) -> None:
    flow.kinds[job.id] = job.task
    started = time.monotonic()
    while True:
        try:
            await jobstore.enqueue(redis, job, replica_wait_ms=REPLICA_WAIT_MS)  # False: an earlier try stored it
            flow.acked.add(job.id)
            break
        except jobstore.NotReplicatedError:
            flow.unacked.add(job.id)
            break
        except (RedisConnectionError, RedisTimeoutError):
            flow.retried += 1
            await asyncio.sleep(0.1)
    flow.stalls.append(time.monotonic() - started)


async def produce(redis: Redis, flow: Flow, jobs: int, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: set[asyncio.Task[None]] = set()
    for i in range(jobs):
        due = start + seconds * i / jobs
        if (delay := due - loop.time()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(enqueue_one(redis, make_job(rng), flow))
        pending.add(task)
        task.add_done_callback(pending.discard)
        while len(pending) >= 64:  # a client's concurrency, bounded
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*pending)


# ---- faults ----------------------------------------------------------------------------------------------------
@dataclass
class Faults:
    cluster: SentinelCluster
    pg: PrivatePostgres
    workers: Workers
    events: list[tuple[float, str]] = field(default_factory=list)  # (unix time, what)
    failover_s: list[float] = field(default_factory=list)

    def run_one(self, n: int) -> None:
        kind = ("worker", "redis", "worker", "postgres", "worker", "failover")[n % 6]
        self.events.append((time.time(), kind))
        if kind == "worker":
            self.workers.kill(1 + n // 2 % (len(self.workers.procs) - 1))  # never worker 0: its RSS is watched
        elif kind == "redis":
            master = self.cluster.current_master()
            master.kill()
            master.start()  # same port, same AOF: usually back within the Sentinels' down-after time
            self.cluster.wait_ready(90)  # replicas resynced before the next fault
        elif kind == "postgres":
            crash_postgres(self.pg)
            time.sleep(1.0)
            self.pg.start()
        else:
            old, killed_at = self.cluster.kill_master()
            self.failover_s.append(self.cluster.wait_failover(old.port) - killed_at)
            old.start()  # the Sentinels turn it into a replica of the new master
            self.cluster.wait_ready(90)
        self.events.append((time.time(), f"{kind} back"))


async def inflict(faults: Faults, seconds: float, every: float) -> None:
    loop = asyncio.get_running_loop()
    end, n = loop.time() + seconds, 0
    while loop.time() + every < end:
        await asyncio.sleep(every)
        await asyncio.to_thread(faults.run_one, n)
        n += 1


async def supervise(workers: Workers, stop: asyncio.Event) -> None:
    while not stop.is_set():
        workers.revive_exited()  # as a process supervisor would
        await asyncio.sleep(1)


async def sample_rss(proc: subprocess.Popen[bytes], samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - start, psutil.Process(proc.pid).memory_info().rss))
        await asyncio.sleep(2)


# ---- accounting ------------------------------------------------------------------------------------------------
async def job_runs(db: asyncpg.Pool, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    rows = await db.fetch("SELECT job_id, status, error FROM job_runs WHERE job_id = ANY($1::text[])", ids)
    return {r["job_id"]: (r["status"], r["error"]) for r in rows}


async def wait_all_recorded(db: asyncpg.Pool, ids: list[str], timeout: float) -> dict[str, tuple[str, str | None]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = await job_runs(db, ids)
        if sum(1 for s, _ in runs.values() if s in FINAL) == len(ids) or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(2)


def read_runs(runs_dir: Path) -> dict[str, list[tuple[float, str]]]:
    per_job: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for path in runs_dir.glob("runs-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a worker killed mid-write leaves a partial last line
                per_job[parts[1]].append((float(parts[0]), parts[2]))
    return per_job


def duplicates(per_job: dict[str, list[tuple[float, str]]], kinds: dict[str, str]) -> list[tuple[str, float, float]]:
    """Jobs that ended twice: (id, first start, last start). A failing job ends at its start."""
    found = []
    for job_id, events in per_job.items():
        ending = "start" if kinds.get(job_id) == "broken" else "done"
        ends = sorted(t for t, e in events if e == ending)
        if len(ends) > 1:
            starts = sorted(t for t, e in events if e == "start")
            found.append((job_id, starts[0], starts[-1]))
    return found


def explained(dup: tuple[str, float, float], events: list[tuple[float, str]]) -> bool:
    """A fault between the first run's start and the re-run's: the first run was in flight at it."""
    _, first, last = dup
    return any(first - 0.5 <= t <= last for t, what in events if not what.startswith("postgres"))


async def leftover_keys(redis: Redis) -> list[str]:
    left = []
    async for key in redis.scan_iter(count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        if name.startswith(PER_JOB_PREFIXES):
            left.append(name)
    keys = jobstore.QueueKeys(QUEUE)
    for structure in (keys.schedule, keys.ready, keys.running, keys.owners, keys.lost):
        if await redis.exists(structure):
            left.append(structure)
    return left


async def wait_baseline(redis: Redis, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := await leftover_keys(redis)) and time.monotonic() < deadline:
        await asyncio.sleep(2)
    return left


# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    flow: Flow
    faults: Faults
    runs: dict[str, tuple[str, str | None]]
    still_live: list[str]
    per_job: dict[str, list[tuple[float, str]]]
    left_keys: list[str]
    baseline_keys: set[str]
    end_keys: set[str]
    rss: list[tuple[float, int]]
    flow_s: float
    drain_s: float
    exits: list[str]


async def rss_of_first_worker(workers: Workers, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    start, pid = time.monotonic(), workers.procs[0].pid
    while not stop.is_set():
        if workers.procs[0].pid != pid:
            samples.append((time.monotonic() - start, -1))  # it exited and was replaced: RSS not comparable
            return
        samples.append((time.monotonic() - start, psutil.Process(pid).memory_info().rss))
        await asyncio.sleep(2)


async def flow_and_faults(
    args: argparse.Namespace, tmp: Path, pg: PrivatePostgres, cluster: SentinelCluster
) -> Outcome:
    runs_dir = tmp / "runs"
    runs_dir.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": pg.url(),
        "REDIS_URL": cluster.url(),
        "CHAOS_RUNS_DIR": str(runs_dir),
        "SALESDASH_DATA_DIR": str(tmp / "data"),
        "SALESDASH_LOG_LEVEL": "WARNING",
        "SALESDASH_DB_POOL_MAX": "4",
    }
    workers = Workers(env, tmp)
    try:
        return await _flow(args, pg, cluster, workers, runs_dir)
    finally:
        workers.stop()


async def _flow(
    args: argparse.Namespace, pg: PrivatePostgres, cluster: SentinelCluster, workers: Workers, runs_dir: Path
) -> Outcome:
    for i in range(args.workers):
        workers.spawn(i)
    redis = await open_redis(Settings(DATABASE_URL=pg.url(), REDIS_URL=cluster.url()))
    deadline = time.monotonic() + 60
    while len(await jobstore.live_workers(redis)) < args.workers and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # every worker registered and through its first heartbeat: the baseline has their keys
    baseline_keys = {k.decode() async for k in redis.scan_iter(count=1000)}
    flow, faults, stop, rss = Flow(), Faults(cluster, pg, workers), asyncio.Event(), []
    side = [asyncio.create_task(supervise(workers, stop)), asyncio.create_task(rss_of_first_worker(workers, rss, stop))]
    started = time.monotonic()
    await asyncio.gather(
        produce(redis, flow, args.jobs, args.seconds, args.seed), inflict(faults, args.seconds, args.every)
    )
    flow_s = time.monotonic() - started
    db = await asyncpg.create_pool(pg.url(), min_size=1, max_size=2)
    ids = list(flow.kinds)
    runs = await wait_all_recorded(db, ids, args.drain)
    drain_s = time.monotonic() - started - flow_s
    left = await wait_baseline(redis, 60)
    still_live = [i for i in ids if i not in runs and await jobstore.live_status(redis, i, [QUEUE]) is not None]
    end_keys = {k.decode() async for k in redis.scan_iter(count=1000)}
    stop.set()
    await asyncio.gather(*side)
    await db.close()
    await redis.aclose(close_connection_pool=True)
    return Outcome(
        flow, faults, runs, still_live, read_runs(runs_dir), left, baseline_keys, end_keys, rss, flow_s, drain_s,
        workers.exits,
    )  # fmt: skip


def invariants(o: Outcome) -> list[tuple[str, str, bool]]:
    kinds, runs = o.flow.kinds, o.runs
    statuses = Counter(s for s, _ in runs.values())
    wrong = [i for i, (s, _) in runs.items() if s != ("failed" if kinds[i] == "broken" else "complete")]
    own_fault = sum(
        1 for i, (s, e) in runs.items() if kinds[i] == "broken" and s == "failed" and "bad input" in (e or "")
    )
    missing = [i for i in kinds if i not in runs and i not in o.still_live]
    lost_acked = [i for i in missing if i in o.flow.acked]
    ran = [i for i in o.per_job if i in kinds]
    unrecorded = [i for i in ran if runs.get(i, ("", None))[0] not in FINAL]
    dups = duplicates(o.per_job, kinds)
    unexplained = [d for d in dups if not explained(d, o.faults.events)]
    rss = [r for t, r in o.rss if t >= 15]
    new_keys = ", ".join(sorted(o.end_keys - o.baseline_keys)) or "none"
    growth = (rss[-1] / rss[0] - 1) if len(rss) > 1 and min(rss) > 0 else float("nan")
    return [
        (
            "every job accounted for",
            f"{len(kinds):,} jobs: {statuses['complete']:,} complete, {statuses['failed']:,} failed "
            f"({own_fault:,} by own fault), {statuses['aborted']:,} aborted, {len(o.still_live)} still live; "
            f"{len(wrong)} with the wrong outcome",
            not wrong and not o.still_live and len(runs) + len(missing) == len(kinds),
        ),
        (
            "none lost",
            f"{len(lost_acked)} of {len(o.flow.acked):,} replica-acknowledged enqueues lost; "
            f"{len(missing) - len(lost_acked)} of {len(o.flow.unacked)} reported-unreplicated lost",
            not lost_acked,
        ),
        (
            "duplicates only in flight at a fault",
            f"{len(dups)} jobs finished twice, {len(unexplained)} of them with no fault during their first run",
            not unexplained,
        ),
        (
            "job history complete",
            f"{len(unrecorded)} of {len(ran):,} jobs that ran lack a final job_runs row",
            not unrecorded,
        ),
        (
            "Redis keys back to baseline",
            f"{len(o.baseline_keys)} keys before, {len(o.end_keys)} after (new: {new_keys}); "
            f"per-job keys or queue entries left: {len(o.left_keys)}"
            + (f" (e.g. {', '.join(o.left_keys[:3])})" if o.left_keys else ""),
            not o.left_keys,
        ),
        (
            "worker RSS flat",
            f"never-killed worker: {rss[0] / 2**20:.0f} MiB at 15 s, {rss[-1] / 2**20:.0f} MiB at the end "
            f"({growth:+.0%})"
            if len(rss) > 1
            else "not measured (worker 0 was replaced)",
            growth < 0.25,
        ),
    ]


def figures(o: Outcome) -> list[tuple[str, str]]:
    kinds = Counter(what for _, what in o.faults.events if not what.endswith(" back"))
    stalls = sorted(o.flow.stalls)
    failovers = o.faults.failover_s
    rerun = sum(
        1
        for i, events in o.per_job.items()
        if o.flow.kinds.get(i) != "flaky" and sum(1 for _, e in events if e == "start") > 1
    )
    return [
        ("jobs by kind", ", ".join(f"{k} {n:,}" for k, n in sorted(Counter(o.flow.kinds.values()).items()))),
        ("faults injected", ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items()))),
        ("Sentinel failover (kill → new master)", ", ".join(f"{s:.1f} s" for s in failovers) or "none"),
        (
            "enqueue",
            f"{len(o.flow.acked):,} acknowledged by a replica, {len(o.flow.unacked)} reported unreplicated, "
            f"{o.flow.retried:,} attempts retried after a Redis fault; longest wait {stalls[-1]:.1f} s, "
            f"p99 {stalls[int(len(stalls) * 0.99)] * 1000:.0f} ms",
        ),
        (
            "jobs run again after a fault",
            f"{rerun:,} (started more than once, retrying kind left out): in flight at a worker kill or a Redis loss",
        ),
        (
            "workers restarted by the supervisor",
            f"{len(o.exits)} (exits the bench did not cause)" + "".join(f"\n{e}" for e in Counter(o.exits)),
        ),
        ("flow / drain", f"{o.flow_s:.0f} s of flow and faults, then {o.drain_s:.0f} s until every job was recorded"),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=90, help="how long jobs are enqueued and faults injected")
    parser.add_argument("--every", type=float, default=4, help="seconds between two faults")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--drain", type=float, default=240, help="longest wait for every job to be recorded")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="salesdash-chaos-"))
    pg = PrivatePostgres()
    try:
        pg.start()
        await asyncio.to_thread(upgrade, pg.url())  # alembic runs its own event loop
        # down-after 3 s: a master restarted on its AOF (~1.5 s under load) is back before the Sentinels act
        with sentinel_cluster(tmp / "redis", replicas=2, down_after_ms=3000, aof=True) as cluster:
            outcome = await flow_and_faults(args, tmp, pg, cluster)
    finally:
        pg.close()
    checks = invariants(outcome)
    table = Table(title=f"Chaos run: {args.jobs:,} jobs over {args.seconds:g} s, a fault every {args.every:g} s")
    table.add_column("invariant")
    table.add_column("measured")
    table.add_column("holds")
    for name, measured, holds in checks:
        table.add_row(name, measured, "yes" if holds else "NO")
    for name, value in figures(outcome):
        table.add_row(name, value, "")
    Console(width=160).print(table)
    if all(h for _, _, h in checks):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        raise SystemExit(f"an invariant does not hold; logs and data kept in {tmp}")


if __name__ == "__main__":
    asyncio.run(main())
