"""The driver behind bench/queue.py (method and usage are in that module's docstring)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg2
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("ours", "ours-100", "arq-default", "arq-tuned", "celery", "saq", "saq-100", "streaq", "streaq-100")
WARMUP_JOBS = 100
RTT_WARMUP = 20
ENQUEUE_CONCURRENCY = 32
POLL_S = 0.005
SETTLE_S = 2.5
SCRATCH_DB = "salesdash_bench_queue"

# a pipe or a log file gets a table wide enough to read; a terminal keeps its own width
console = Console(width=None if sys.stdout.isatty() else max(shutil.get_terminal_size((170, 24)).columns, 170))


# ---- processes -------------------------------------------------------------------------------------------
_started: list[subprocess.Popen[bytes]] = []


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # each worker is the leader of its own process group (start_new_session), so this reaches celery's
    # pool children too and nothing else
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started.append(proc)
    return proc


def _spawn_piped(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A helper client (bench/_queue_client.py): requests on its stdin, replies on its stdout, stderr to a log."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
    _started.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGCONT)  # a frozen process would hold SIGTERM pending
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5)
    _signal_group(proc, signal.SIGKILL)  # pool children left behind by the leader, if any
    with contextlib.suppress(ValueError):
        _started.remove(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_started):
        _signal_group(proc, signal.SIGCONT)
        _signal_group(proc, signal.SIGKILL)


def _group_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """User + system CPU seconds of the worker and its children (celery's pool)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


class WorkerDiedError(RuntimeError):
    pass


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass
class Config:
    jobs: int
    repeat: int
    rtt: int
    idle_s: float
    redis_base: str  # redis://host:port
    db: int
    pg_base: str  # postgresql://user@host:port
    log_level: str
    log_dir: Path
    quiet_wait_s: float
    quiet_pct: float
    profile: bool = False
    py_spy: bool = False

    def profiler(self, key: str) -> list[str]:
        """`--profile`: run an asyncio worker under cProfile (written when it exits on SIGTERM)."""
        return ["-m", "cProfile", "-o", str(self.log_dir / f"{key}.prof")] if self.profile else []

    def redis_url(self, db: int | None = None) -> str:
        return f"{self.redis_base}/{self.db if db is None else db}"

    @property
    def database_url(self) -> str:
        return f"{self.pg_base}/{SCRATCH_DB}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "REDIS_URL": self.redis_url(),
            "BENCH_REDIS_URL": self.redis_url(),
            "DATABASE_URL": self.database_url,
            "SALESDASH_LOG_LEVEL": self.log_level,
            "SALESDASH_MAX_JOBS_PER_PROCESS": "",  # no recycling mid-drain, whatever the caller's shell says
            "BENCH_CELERY_BROKER": self.redis_url(),
            "BENCH_CELERY_BACKEND": self.redis_url(self.db + 1),
        }
        env.update(extra)
        return env


# ---- one system --------------------------------------------------------------------------------------------
@dataclass
class Measured:
    key: str
    label: str
    jobs: int = 0
    drains: list[float] = field(default_factory=list)  # seconds, one per --repeat
    rtt_ms: list[float] = field(default_factory=list)
    idle_cmds_s: float | None = None
    idle_detail: str = ""
    worker_cpu_us: list[float] = field(default_factory=list)  # per job, one per drain
    redis_cpu_us: list[float] = field(default_factory=list)
    others_pct: list[float] = field(default_factory=list)  # CPU used by other processes, % of one core
    notes: list[str] = field(default_factory=list)
    ok: bool = True

    @property
    def drain_s(self) -> float | None:
        return statistics.median(self.drains) if self.drains else None

    @property
    def jobs_s(self) -> float | None:
        return self.jobs / self.drain_s if self.drain_s else None

    def pct(self, q: float) -> float | None:
        if not self.rtt_ms:
            return None
        xs = sorted(self.rtt_ms)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Bench:
    """What differs between systems: how to start, enqueue, count unfinished jobs, and do one round trip."""

    key = ""
    label = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.redis: ArqRedis | None = None

    @property
    def r(self) -> ArqRedis:
        assert self.redis is not None
        return self.redis

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return self.cfg.env()

    def databases(self) -> list[int]:
        return [self.cfg.db]

    def info(self) -> list[str]:
        """Notes known once the system is open (versions)."""
        return []

    async def open(self) -> None:
        self.redis = await create_pool(RedisSettings.from_dsn(self.cfg.redis_url()))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close(close_connection_pool=True)

    async def prepare(self) -> None:
        """Before the worker starts (Redis is already flushed)."""

    async def started(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        """After the worker process is spawned, before the warm-up (a system that must not get jobs yet)."""

    async def enqueue(self, task: str, ids: list[str]) -> None:
        raise NotImplementedError

    async def unfinished(self) -> int:
        raise NotImplementedError

    async def roundtrip(self) -> None:
        raise NotImplementedError

    async def roundtrips(self, n: int) -> list[float]:
        """n sequential round trips, in ms each."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await self.roundtrip()
            times.append((time.perf_counter() - t) * 1000)
        return times

    async def results_stored(self, prefix: str) -> int:
        raise NotImplementedError

    async def checks(self, m: Measured, prefix: str, runs_so_far: int, drained_at: float) -> None:
        """Extra checks after a drain (ours: history and metrics)."""

    async def _gather_limited(self, make: Callable[[str], Awaitable[Any]], ids: list[str]) -> None:
        for i in range(0, len(ids), ENQUEUE_CONCURRENCY):
            await asyncio.gather(*(make(x) for x in ids[i : i + ENQUEUE_CONCURRENCY]))

    async def _scan_count(self, redis: Redis, pattern: str) -> int:
        n = 0
        async for _ in redis.scan_iter(match=pattern, count=1000):
            n += 1
        return n


class Ours(Bench):
    def __init__(self, cfg: Config, key: str, settings: str, max_jobs: int) -> None:
        super().__init__(cfg)
        self.key, self.settings = key, settings
        self.label = f"ours (max_jobs={max_jobs})"

    def command(self) -> list[str]:
        return [sys.executable, *self.cfg.profiler(self.key), "-m", "arq", self.settings]

    async def prepare(self) -> None:
        await asyncio.to_thread(_pg_exec, self.cfg.database_url, "TRUNCATE job_runs")

    @staticmethod
    def _job(task: str, job_id: str, notify: bool = False) -> Any:
        from worker import jobstore as js
        from worker.records import JobPayload

        now = js.now_ms()
        return JobPayload(job_id, task, [], {}, "bench", 5, now, now, notify=notify)

    async def enqueue(self, task: str, ids: list[str]) -> None:
        from worker import jobstore as js

        await self._gather_limited(lambda i: js.enqueue(self.r, self._job(task, i)), ids)

    async def unfinished(self) -> int:
        from worker import jobstore as js

        # every live job (waiting, ready, running) is in the queue's schedule set until its result is stored
        return int(await self.r.zcard(js.QueueKeys("bench").schedule))

    async def roundtrip(self) -> None:
        from worker import jobstore as js

        job = self._job("ping", js.new_job_id(), notify=True)
        assert await js.enqueue(self.r, job)
        if not await js.wait_done(self.r, job.id, 10):
            raise TimeoutError("round trip: no done signal within 10 s")

    async def results_stored(self, prefix: str) -> int:
        from worker import jobstore as js

        return await self._scan_count(self.r, js.result_key(prefix) + "*")

    async def checks(self, m: Measured, prefix: str, runs_so_far: int, drained_at: float) -> None:
        """History rows of this drain in job_runs, and the fleet metrics' success counter for `noop` (which
        counts every drain so far), must both reach the job count."""
        from worker.metrics import METRICS_KEY, _field

        metric_field = _field("total", "noop", "bench", "success")
        want_metric = runs_so_far * m.jobs
        rows = counted = 0
        rows_at = counted_at = None
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and (rows_at is None or counted_at is None):
            if rows_at is None:
                rows = await asyncio.to_thread(
                    _pg_scalar,
                    self.cfg.database_url,
                    "SELECT count(*) FROM job_runs WHERE task_name = 'noop' AND queue = 'bench'"
                    f" AND status = 'complete' AND job_id LIKE '{prefix}%'",
                )
                if rows >= m.jobs:
                    rows_at = time.perf_counter()
            if counted_at is None:
                counted = int(float(await self.r.hget(METRICS_KEY, metric_field) or 0))
                if counted >= want_metric:
                    counted_at = time.perf_counter()
            await asyncio.sleep(0.05)

        def lag(t: float | None) -> str:
            return f" +{t - drained_at:.1f} s" if t is not None else " timed out"

        m.notes.append(f"job_runs {rows:,}/{m.jobs:,}{lag(rows_at)}")
        m.notes.append(f"metrics {counted - want_metric + m.jobs:,}/{m.jobs:,}{lag(counted_at)}")
        m.ok = m.ok and rows == m.jobs and counted == want_metric


class PlainArq(Bench):
    QUEUE = "arq:benchq"

    def __init__(self, cfg: Config, key: str, settings: str, label: str) -> None:
        super().__init__(cfg)
        self.key, self.settings, self.label = key, settings, label

    def command(self) -> list[str]:
        cmd = [sys.executable, *self.cfg.profiler(self.key), "-m", "arq", self.settings]
        if self.cfg.log_level.upper() != "INFO":
            cmd += ["--custom-log-dict", "bench._queue_arq.QUIET_LOG"]
        return cmd

    async def enqueue(self, task: str, ids: list[str]) -> None:
        await self._gather_limited(lambda i: self.r.enqueue_job(task, _job_id=i, _queue_name=self.QUEUE), ids)

    async def unfinished(self) -> int:
        return int(await self.r.zcard(self.QUEUE))

    async def roundtrip(self) -> None:
        job = await self.r.enqueue_job("ping", _queue_name=self.QUEUE)
        assert job is not None
        await job.result(timeout=10, poll_delay=0.001)

    async def results_stored(self, prefix: str) -> int:
        return await self._scan_count(self.r, f"arq:result:{prefix}*")


class CeleryBench(Bench):
    key = "celery"
    label = "celery (prefork, 2 procs)"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="celery-client")  # celery clients: one thread
        self.results: Redis | None = None
        self.expected = 0
        self.apps: tuple[Any, Any] | None = None

    def databases(self) -> list[int]:
        return [self.cfg.db, self.cfg.db + 1]

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench._queue_celery",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-Q",
            "benchq",
            "-n",
            f"bench-{os.getpid()}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            self.cfg.log_level.upper(),
        ]

    def _call(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def open(self) -> None:
        await super().open()
        self.results = Redis.from_url(self.cfg.redis_url(self.cfg.db + 1))

        def make() -> tuple[Any, Any]:
            os.environ["BENCH_CELERY_BROKER"] = self.cfg.redis_url()
            os.environ["BENCH_CELERY_BACKEND"] = self.cfg.redis_url(self.cfg.db + 1)
            from bench import _queue_celery

            return _queue_celery.make_app(result_backend=False), _queue_celery.make_app()

        self.apps = await self._call(make)

    async def close(self) -> None:
        if self.apps is not None:
            await self._call(lambda: [app.close() for app in self.apps or ()])
        if self.results is not None:
            await self.results.close(close_connection_pool=True)
        self.thread.shutdown(wait=True)
        await super().close()

    async def enqueue(self, task: str, ids: list[str]) -> None:
        assert self.apps is not None
        enq = self.apps[0]

        def send() -> None:
            with enq.producer_or_acquire() as producer:
                for i in ids:
                    enq.send_task(task, task_id=i, producer=producer)

        self.expected += len(ids)
        await self._call(send)

    async def unfinished(self) -> int:
        assert self.results is not None
        return max(self.expected - int(await self.results.dbsize()), 0)

    async def roundtrip(self) -> None:
        assert self.apps is not None
        rtt_app = self.apps[1]

        def once() -> None:
            rtt_app.send_task("ping").get(timeout=10, interval=0.001)

        self.expected += 1
        await self._call(once)

    async def results_stored(self, prefix: str) -> int:
        assert self.results is not None
        return await self._scan_count(self.results, f"celery-task-meta-{prefix}*")


# ---- systems in their own virtualenvs (SAQ, streaQ) -------------------------------------------------------
@dataclass(frozen=True)
class VenvSpec:
    """A virtualenv at the repo root, made on demand: their dependencies clash with arq's (redis-py < 6)."""

    name: str
    requirements: tuple[str, ...]

    @property
    def path(self) -> Path:
        return REPO / f".venv-bench-{self.name}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


# saq 0.26.4 imports typing_extensions without declaring it
SAQ_VENV = VenvSpec("saq", ("saq[redis,hiredis]==0.26.*", "typing_extensions"))
STREAQ_VENV = VenvSpec("streaq", ("streaq>=7,<8",))
VENV_STAMP = ".bench-requirements"


def _run_logged(cmd: list[str], log: Path) -> None:
    with log.open("ab") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; log {log}:\n{_log_tail(log)}")


def ensure_venv(spec: VenvSpec, log: Path) -> Path:
    """Create the venv and install its requirements, unless it already has exactly these (a stamp file says)."""
    wanted = "\n".join(spec.requirements) + "\n"
    stamp = spec.path / VENV_STAMP
    if spec.python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return spec.python
    console.print(f"\n{spec.path.name}: installing {' '.join(spec.requirements)} (log {log}) …", markup=False)
    stamp.unlink(missing_ok=True)
    if not spec.python.exists():
        _run_logged([sys.executable, "-m", "venv", str(spec.path)], log)
    _run_logged(
        [str(spec.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec.requirements], log
    )
    stamp.write_text(wanted)
    return spec.python


def _request(client: subprocess.Popen[bytes], request: dict[str, Any], log: Path) -> Any:
    """One request to a helper client, blocking (run in a thread)."""
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write(json.dumps(request).encode() + b"\n")
        client.stdin.flush()
        line = client.stdout.readline()
    except BrokenPipeError:
        line = b""
    if not line:
        raise WorkerDiedError(f"client exited with {client.poll()}; log {log}:\n{_log_tail(log)}")
    reply = json.loads(line)
    if "error" in reply:
        raise RuntimeError(f"client: {reply['error']}")
    return reply["ok"]


class VenvBench(Bench):
    """Worker and client run with the system's own venv python; the client is a helper process
    (`python -m <module>`, bench/_queue_client.py) that enqueues and times round trips. The driver itself only
    reads Redis (unfinished jobs, stored results), with its own redis-py."""

    spec: VenvSpec
    module = ""
    name = ""

    def __init__(self, cfg: Config, key: str, concurrency: int) -> None:
        super().__init__(cfg)
        self.key, self.concurrency = key, concurrency
        self.label = f"{self.name} (concurrency={concurrency})"
        self.client: subprocess.Popen[bytes] | None = None
        self.versions = ""

    @property
    def client_log(self) -> Path:
        return self.cfg.log_dir / f"{self.key}.client.log"

    def env(self) -> dict[str, str]:
        return self.cfg.env(
            BENCH_CONCURRENCY=str(self.concurrency),
            BENCH_LOG_LEVEL=self.cfg.log_level.upper(),
            VIRTUAL_ENV=str(self.spec.path),
            PATH=os.pathsep.join([str(self.spec.path / "bin"), os.environ.get("PATH", "")]),
        )

    def info(self) -> list[str]:
        return [self.versions] if self.versions else []

    async def open(self) -> None:
        await asyncio.to_thread(ensure_venv, self.spec, self.cfg.log_dir / f"venv-{self.spec.name}.log")
        await super().open()
        await self.before_client()
        self.client = _spawn_piped([str(self.spec.python), "-m", self.module], self.env(), self.client_log)
        self.versions = str(await self._call("hello"))
        self.label = f"{self.versions.split(',')[0]} (concurrency={self.concurrency})"

    async def before_client(self) -> None:
        """After Redis is open, before the helper client starts."""

    async def _call(self, op: str, **args: Any) -> Any:
        if self.client is None:
            raise RuntimeError(f"{self.key}: client not started")
        return await asyncio.to_thread(_request, self.client, {"op": op, **args}, self.client_log)

    async def stop_client(self) -> None:
        """Closing its stdin ends the client (it disconnects from Redis); then make sure it is gone."""
        client, self.client = self.client, None
        if client is None:
            return
        with contextlib.suppress(OSError):
            assert client.stdin is not None
            client.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(client.wait, 5)
        await asyncio.to_thread(_stop, client, 1)

    async def close(self) -> None:
        await self.stop_client()
        await super().close()

    async def enqueue(self, task: str, ids: list[str]) -> None:
        await self._call("enqueue", task=task, ids=ids)

    async def roundtrips(self, n: int) -> list[float]:
        return [float(ms) for ms in await self._call("roundtrips", n=n)]

    async def roundtrip(self) -> None:
        await self.roundtrips(1)


class SaqBench(VenvBench):
    spec = SAQ_VENV
    module = "bench._queue_saq"
    name = "saq 0.26"
    INCOMPLETE = "saq:benchq:incomplete"
    SWEEP_LOCK = "saq:benchq:sweep"

    def command(self) -> list[str]:
        cmd = [str(self.spec.python), *self.cfg.profiler(self.key), "-m", "saq", "bench._queue_saq.settings"]
        return cmd + ["-v"] if self.cfg.log_level.upper() == "INFO" else cmd  # SAQ's CLI defaults to WARNING

    async def started(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        """A starting SAQ worker sweeps its active list at once; jobs it has just taken (BLMOVE) but not yet marked
        active look stuck to that sweep, which aborts and retries them 5 s apart. So the warm-up is enqueued only
        once the startup sweep has run (it leaves its 60 s lock key)."""
        deadline = time.perf_counter() + 90
        while not await self.r.exists(self.SWEEP_LOCK):
            if proc.poll() is not None:
                raise WorkerDiedError(f"{self.key} worker exited with {proc.returncode}; log {log}:\n{_log_tail(log)}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.key}: no startup sweep within 90 s")
            await asyncio.sleep(POLL_S)

    async def unfinished(self) -> int:
        return int(await self.r.zcard(self.INCOMPLETE))

    async def results_stored(self, prefix: str) -> int:
        """Job keys exist from the enqueue on: count those stored as complete."""
        keys = [k async for k in self.r.scan_iter(match=f"saq:job:benchq:{prefix}*", count=1000)]
        done = 0
        for i in range(0, len(keys), 1000):
            done += sum(
                1
                for raw in await self.r.mget(keys[i : i + 1000])
                if raw and json.loads(raw).get("status") == "complete"
            )
        return done


class StreaqBench(VenvBench):
    spec = STREAQ_VENV
    module = "bench._queue_streaq"
    name = "streaq 7"
    STREAM = "streaq:benchq:queues:normal"
    DELAYED = "streaq:benchq:queues:delayed:normal"
    LIBRARY = "streaq"

    def __init__(self, cfg: Config, key: str, concurrency: int) -> None:
        super().__init__(cfg, key, concurrency)
        self.saved_library: bytes | None = None
        self.library_saved = False  # restore only what was read

    def command(self) -> list[str]:
        return [
            str(self.spec.python),
            *self.cfg.profiler(self.key),
            "-m",
            "streaq",
            "run",
            "bench._queue_streaq:worker",
        ]

    async def before_client(self) -> None:
        self.saved_library = await _function_library_code(self.r, self.LIBRARY)
        self.library_saved = True

    async def close(self) -> None:
        """streaQ's Lua library is server-wide: put back what was there before (usually nothing)."""
        await self.stop_client()
        if self.redis is not None and self.library_saved:
            await _restore_function_library(self.r, self.LIBRARY, self.saved_library)
        await super().close()

    async def unfinished(self) -> int:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xlen(self.STREAM)
            pipe.zcard(self.DELAYED)
            counts = await pipe.execute()
        return int(sum(counts))

    async def results_stored(self, prefix: str) -> int:
        return await self._scan_count(self.r, f"streaq:benchq:task:results:{prefix}*")


async def _function_library_code(r: Redis, name: str) -> bytes | None:
    for lib in await r.function_list(library=name, withcode=True):
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(lib[::2], lib[1::2], strict=True)}
        if fields.get("library_name") in (name, name.encode()):
            code = fields["library_code"]
            return code if isinstance(code, bytes) else str(code).encode()
    return None


async def _restore_function_library(r: Redis, name: str, code: bytes | None) -> None:
    try:
        if code is None:
            await r.function_delete(name)
        else:
            await r.function_load(code.decode(), replace=True)
    except Exception as exc:  # e.g. the library was never loaded: nothing to undo
        if code is not None or "not found" not in str(exc).lower():
            console.print(f"[yellow]could not restore Redis function library {name!r}: {exc}[/yellow]")


# ---- PostgreSQL scratch database -----------------------------------------------------------------------
def _pg_exec(url: str, sql: str) -> None:
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _pg_scalar(url: str, sql: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def create_scratch_db(cfg: Config) -> None:
    admin = f"{cfg.pg_base}/postgres"
    _pg_exec(admin, f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")
    _pg_exec(admin, f"CREATE DATABASE {SCRATCH_DB}")
    from db.migrate import upgrade

    upgrade(cfg.database_url)  # sync; runs its own event loop, so outside ours


def drop_scratch_db(cfg: Config) -> None:
    with contextlib.suppress(psycopg2.Error):
        _pg_exec(f"{cfg.pg_base}/postgres", f"DROP DATABASE IF EXISTS {SCRATCH_DB} WITH (FORCE)")


# ---- measuring ---------------------------------------------------------------------------------------------
async def _wait_finished(b: Bench, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    """Poll until no enqueued job is unfinished; returns perf_counter() of the first poll that saw that."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if await b.unfinished() == 0:
            return time.perf_counter()
        if proc.poll() is not None:
            raise WorkerDiedError(f"{b.key} worker exited with {proc.returncode}; log {log}:\n{_log_tail(log)}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{b.key}: {await b.unfinished()} jobs still unfinished after {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)


async def _redis_cpu_s(r: Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def count_commands(cfg: Config, dbs: list[int], seconds: float) -> tuple[float, str]:
    """Top-level commands on the given databases per second, seen through MONITOR, plus a breakdown."""
    host, port = urlsplit(cfg.redis_base).hostname or "127.0.0.1", urlsplit(cfg.redis_base).port or 6379
    reader, writer = await asyncio.open_connection(host, port)
    wanted = {str(d) for d in dbs}
    seen: Counter[str] = Counter()
    try:
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 5)
        if not first.startswith(b"+OK"):
            raise RuntimeError(f"MONITOR refused: {first!r}")
        end = time.perf_counter() + seconds
        while (left := end - time.perf_counter()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except TimeoutError:
                break
            # +1700000000.123456 [12 127.0.0.1:50766] "BLPOP" "key" "1"   (inside Lua: [12 lua])
            text = line.decode(errors="replace")
            head, _, rest = text.partition("] ")
            db, _, addr = head.partition("[")[2].partition(" ")
            if db in wanted and addr != "lua":
                seen[rest.split(" ", 1)[0].strip().strip('"').upper()] += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    detail = " ".join(f"{cmd} {n / seconds:.1f}" for cmd, n in seen.most_common(6))
    return sum(seen.values()) / seconds, detail


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _start_py_spy(cfg: Config, key: str, proc: subprocess.Popen[bytes], run: int) -> subprocess.Popen[bytes] | None:
    """`--py-spy`: sample the (still frozen) worker from its release until the drain is done."""
    exe = Path(sys.executable).with_name("py-spy")
    if not cfg.py_spy or key == "celery" or not exe.exists():
        return None
    target = psutil.Process(proc.pid)
    if target.children():  # under cProfile or a wrapper: sample the python process that runs the loop
        target = target.children()[0]
    spy = subprocess.Popen(
        [
            str(exe),
            "record",
            "-p",
            str(target.pid),
            "-r",
            "997",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(cfg.log_dir / f"{key}.run{run}.raw"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _started.append(spy)
    time.sleep(0.5)  # attached before the release
    return spy


def _finish_py_spy(spy: subprocess.Popen[bytes], summary: Path) -> None:
    """Stop the sampler (it writes on SIGINT) and summarise: share of samples per function, self and total."""
    raw = Path(spy.args[-1])  # type: ignore[index]
    spy.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(20)
    _stop(spy, grace_s=1)
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with contextlib.suppress(OSError):
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = [f.split(" (", 1)[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in stack.split(";")]
            k = int(n)
            samples += k
            own[frames[-1]] += k
            for frame in set(frames):
                total[frame] += k
    lines = [f"{samples} samples (only while the worker was on CPU)", "", "self %   function"]
    lines += [f"{100 * c / max(samples, 1):5.1f}   {f}" for f, c in own.most_common(40)]
    lines += ["", "total %  function (with callees)"]
    lines += [f"{100 * c / max(samples, 1):5.1f}   {f}" for f, c in total.most_common(60)]
    summary.write_text("\n".join(lines) + "\n")


async def _wait_quiet(cfg: Config, proc: subprocess.Popen[bytes]) -> float:
    """Other people's processes share this machine's 2 cores: before a timed phase, wait (up to
    --quiet-wait seconds) until processes other than this bench and its worker use less than --quiet-pct
    of one core over a 1 s sample. Returns the last sample, in % of one core."""
    me = psutil.Process()
    deadline = time.perf_counter() + cfg.quiet_wait_s
    while True:
        busy0, mine0, worker0, t0 = _busy_cpu_s(), sum(me.cpu_times()[:2]), _group_cpu_s(proc), time.perf_counter()
        await asyncio.sleep(1.0)
        others = (_busy_cpu_s() - busy0) - (sum(me.cpu_times()[:2]) - mine0) - (_group_cpu_s(proc) - worker0)
        pct = max(others, 0.0) / (time.perf_counter() - t0) * 100
        if pct < cfg.quiet_pct or time.perf_counter() >= deadline:
            return pct


async def _drain_once(
    b: Bench, m: Measured, cfg: Config, proc: subprocess.Popen[bytes], log: Path, admin: Redis, run: int
) -> None:
    prefix = f"bench{run}-"
    await _wait_quiet(cfg, proc)
    _signal_group(proc, signal.SIGSTOP)
    await b.enqueue("noop", [f"{prefix}{i:06d}" for i in range(cfg.jobs)])
    waiting = await b.unfinished()
    if waiting != cfg.jobs:
        m.notes.append(f"{waiting} waiting at release (expected {cfg.jobs})")
    me = psutil.Process()
    cpu0, rcpu0, self0, busy0 = _group_cpu_s(proc), await _redis_cpu_s(admin), sum(me.cpu_times()[:2]), _busy_cpu_s()
    spy = _start_py_spy(cfg, b.key, proc, run)
    t0 = time.perf_counter()
    _signal_group(proc, signal.SIGCONT)
    t1 = await _wait_finished(b, proc, log, timeout_s=max(300.0, cfg.jobs / 20))
    if spy is not None:
        await asyncio.to_thread(_finish_py_spy, spy, cfg.log_dir / f"{b.key}.run{run}.spy.txt")
    worker, redis_cpu = _group_cpu_s(proc) - cpu0, await _redis_cpu_s(admin) - rcpu0
    others = _busy_cpu_s() - busy0 - worker - redis_cpu - (sum(me.cpu_times()[:2]) - self0)
    m.drains.append(t1 - t0)
    m.worker_cpu_us.append(worker / cfg.jobs * 1e6)
    m.redis_cpu_us.append(redis_cpu / cfg.jobs * 1e6)
    m.others_pct.append(max(others, 0.0) / (t1 - t0) * 100)
    stored = await b.results_stored(prefix)
    if stored != cfg.jobs:
        m.ok = False
        m.notes.append(f"run {run + 1}: only {stored}/{cfg.jobs} results stored")
    elif run == 0:
        m.notes.append(f"results {stored:,}/{cfg.jobs:,}")
    if run == 0:  # the history/metrics lag is shown for the first drain; all drains are checked
        await b.checks(m, prefix, run + 1, t1)
    else:
        extra = Measured(m.key, m.label, jobs=m.jobs)
        await b.checks(extra, prefix, run + 1, t1)
        if not extra.ok:
            m.ok = False
            m.notes += [f"run {run + 1}: {n}" for n in extra.notes]


async def run_system(b: Bench, cfg: Config) -> Measured:
    m = Measured(b.key, b.label, jobs=cfg.jobs)
    log = cfg.log_dir / f"{b.key}.log"
    admin = Redis.from_url(cfg.redis_url())
    proc: subprocess.Popen[bytes] | None = None
    try:
        for db in b.databases():
            flusher = Redis.from_url(cfg.redis_url(db))
            await flusher.flushdb()
            await flusher.close(close_connection_pool=True)
        await b.open()
        m.label, m.notes = b.label, [*m.notes, *b.info()]
        await b.prepare()
        proc = _spawn(b.command(), b.env(), log)
        await b.started(proc, log)

        # 1. warm-up and readiness
        await b.enqueue("ping", [f"warm-{i}" for i in range(WARMUP_JOBS)])
        await _wait_finished(b, proc, log, timeout_s=90)

        # 2. idle commands per second
        await asyncio.sleep(SETTLE_S)
        m.idle_cmds_s, m.idle_detail = await count_commands(cfg, b.databases(), cfg.idle_s)

        # 3. idle round trip
        await _wait_quiet(cfg, proc)
        m.rtt_ms = (await b.roundtrips(RTT_WARMUP + cfg.rtt))[RTT_WARMUP:]
        await asyncio.sleep(0.5)

        # 4. drain: freeze, enqueue, release, time until every result exists; 5. checks
        for run in range(cfg.repeat):
            await _drain_once(b, m, cfg, proc, log, admin, run)
    except Exception as exc:  # one system failing must not lose the others' numbers
        m.ok = False
        m.notes.append(f"ERROR {type(exc).__name__}: {exc}")
        if "redis-py versions" in str(exc):
            m.notes.append("kombu 5.7 needs redis-py>=6.1, arq 0.28 needs redis-py<6: install kombu<5.7 (5.6.2 works)")
        console.print(f"[red]{b.key} failed:[/red] {exc}  (log: {log})")
    finally:
        if proc is not None:
            await asyncio.to_thread(_stop, proc)
        with contextlib.suppress(Exception):
            await b.close()
        with contextlib.suppress(Exception):
            await admin.close(close_connection_pool=True)
    errors = _count_log_errors(log)
    if errors:
        m.notes.append(f"{errors} error lines in log")
    return m


def _count_log_errors(log: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(
            1
            for line in log.read_text(errors="replace").splitlines()
            if " ERROR " in line or line.startswith(("Traceback", "ERROR:", "[ERROR]", "[CRITICAL]"))
        )
    return 0


# ---- report ------------------------------------------------------------------------------------------------
def render(results: list[Measured], cfg: Config) -> Table:
    ours = next((m.jobs_s for m in results if m.key == "ours" and m.jobs_s), None)
    table = Table(
        title=f"Queue bench: {cfg.jobs:,} no-op jobs per system, one worker process, "
        f"{os.cpu_count()} cores, logging {cfg.log_level.upper()} to a file"
    )
    for col in (
        "system",
        "jobs/s",
        "drain s",
        "× ours",
        "RTT p50 ms",
        "RTT p99 ms",
        "idle cmds/s",
        "worker CPU µs/job",
        "redis CPU µs/job",
        "checks / notes",
    ):
        table.add_column(col, justify="left" if col in ("system", "checks / notes") else "right", overflow="fold")

    def f(v: float | list[float] | None, spec: str) -> str:
        if isinstance(v, list):
            v = statistics.median(v) if v else None
        return "—" if v is None else format(v, spec)

    for m in results:
        notes = list(m.notes)
        if len(m.drains) > 1:
            notes.insert(0, "drains " + " / ".join(f"{d:.2f}" for d in m.drains) + " s")
        if m.others_pct and max(m.others_pct) >= 10:
            notes.append(
                f"[yellow]other processes used up to {max(m.others_pct):.0f}% of a core during the drain[/yellow]"
            )
        if m.idle_detail:
            notes.append(f"idle: {m.idle_detail}")
        table.add_row(
            m.label,
            f(m.jobs_s, ",.0f"),
            f(m.drain_s, ".2f"),
            f(m.jobs_s / ours if (ours and m.jobs_s) else None, ".2f"),
            f(m.pct(0.5), ".2f"),
            f(m.pct(0.99), ".2f"),
            f(m.idle_cmds_s, ".1f"),
            f(m.worker_cpu_us, ",.0f"),
            f(m.redis_cpu_us, ",.0f"),
            ("" if m.ok else "[red]FAILED[/red] ") + "; ".join(notes),
        )
    return table


def targets(results: list[Measured]) -> list[str]:
    lines = []
    for m in results:
        if not m.key.startswith("ours"):
            continue
        p50 = m.pct(0.5)
        checks = [
            ("≥ 1,000 jobs/s with history and metrics on", m.jobs_s is not None and m.jobs_s >= 1000 and m.ok),
            ("idle round trip p50 ≤ 5 ms", p50 is not None and p50 <= 5),
            ("idle worker ≤ 20 Redis commands/s", m.idle_cmds_s is not None and m.idle_cmds_s <= 20),
        ]
        lines.append(
            f"{m.label}: " + ", ".join(f"{name} [{'green]PASS' if ok else 'red]FAIL'}[/]" for name, ok in checks)
        )
    return lines


# ---- entry point -------------------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/queue.py",
        description="Drain no-op jobs with our worker, plain arq, Celery, SAQ and streaQ; print throughput, idle "
        "round trip and idle Redis commands/s. The method is described at the top of bench/queue.py.",
    )
    p.add_argument("--jobs", type=int, default=10_000, help="no-op jobs drained per system (default 10000)")
    p.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--repeat", type=int, default=1, help="drains per system; the median is shown (default 1)")
    p.add_argument("--rtt", type=int, default=200, help="sequential idle round trips measured (default 200)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle command-count window (default 5)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server, without a database")
    p.add_argument("--db", type=int, default=12, help="Redis database (celery's results use db+1); flushed")
    p.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432",
        help=f"PostgreSQL server, without a database; {SCRATCH_DB} is created and dropped",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["INFO", "WARNING"],
        help="worker log level (INFO, each worker's default, goes to a file)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each timed phase, wait up to this long for other processes to calm down (s)",
    )
    p.add_argument(
        "--quiet-pct",
        type=float,
        default=25.0,
        help="'calm' means other processes use less than this %% of one core (default 25)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the asyncio workers (not celery) under cProfile; <log dir>/<system>.prof (slows them)",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the asyncio workers with py-spy (if installed in .venv) during each drain; "
        "summaries in <log dir>/<system>.run<N>.spy.txt",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="where worker logs go (default: a temp dir)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SYSTEMS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    if args.jobs < 1 or args.repeat < 1 or args.rtt < 1:
        p.error("--jobs, --repeat and --rtt must be positive")
    return args


def _benches(cfg: Config, only: list[str]) -> list[Bench]:
    made: dict[str, Callable[[], Bench]] = {
        "ours": lambda: Ours(cfg, "ours", "bench._queue_ours.Settings", 20),
        "ours-100": lambda: Ours(cfg, "ours-100", "bench._queue_ours.Settings100", 100),
        "arq-default": lambda: PlainArq(
            cfg, "arq-default", "bench._queue_arq.DefaultSettings", "arq 0.28 default (max_jobs=10, poll 0.5 s)"
        ),
        "arq-tuned": lambda: PlainArq(
            cfg, "arq-tuned", "bench._queue_arq.TunedSettings", "arq 0.28 tuned (max_jobs=100, poll 0.01 s)"
        ),
        "celery": lambda: CeleryBench(cfg),
        "saq": lambda: SaqBench(cfg, "saq", 20),
        "saq-100": lambda: SaqBench(cfg, "saq-100", 100),
        "streaq": lambda: StreaqBench(cfg, "streaq", 20),
        "streaq-100": lambda: StreaqBench(cfg, "streaq-100", 100),
    }
    return [made[k]() for k in SYSTEMS if k in only]


async def _run_all(cfg: Config, benches: list[Bench], results: list[Measured]) -> None:
    for b in benches:
        console.print(f"[bold]{b.label}[/bold] …", end=" ")
        t = time.perf_counter()
        m = await run_system(b, cfg)
        console.print(f"{f'{m.jobs_s:,.0f} jobs/s' if m.jobs_s else 'no result'} ({time.perf_counter() - t:.0f} s)")
        results.append(m)


def _flush_bench_dbs(cfg: Config) -> None:
    """Leave the shared Redis as we found it: the bench databases hold tens of thousands of results."""
    import redis

    for db in (cfg.db, cfg.db + 1):
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(cfg.redis_url(db))
            client.flushdb()
            client.close()


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="salesdash-bench-queue-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_base = args.redis.rstrip("/")
    cfg = Config(
        jobs=args.jobs,
        repeat=args.repeat,
        rtt=args.rtt,
        idle_s=args.idle_seconds,
        redis_base=redis_base,
        db=args.db,
        pg_base=args.postgres.rstrip("/"),
        log_level=args.log_level,
        log_dir=log_dir,
        quiet_wait_s=args.quiet_wait,
        quiet_pct=args.quiet_pct,
        profile=args.profile,
        py_spy=args.py_spy,
    )
    only = args.only.split(",")
    signal.signal(signal.SIGTERM, _terminate)
    needs_pg = any(k.startswith("ours") for k in only)
    results: list[Measured] = []
    interrupted = False
    try:
        if needs_pg:
            console.print(f"PostgreSQL: creating and migrating {SCRATCH_DB} …")
            create_scratch_db(cfg)
        asyncio.run(_run_all(cfg, _benches(cfg, only), results))
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
    finally:
        for proc in list(_started):
            _stop(proc, grace_s=5)
        if needs_pg:
            drop_scratch_db(cfg)
        _flush_bench_dbs(cfg)
    console.print(render(results, cfg))
    for line in targets(results):
        console.print(line)
    if cfg.py_spy:
        console.print(f"py-spy summaries: {', '.join(str(p) for p in sorted(log_dir.glob('*.spy.txt')))}")
    if cfg.profile:
        console.print(
            f"profiles: {', '.join(str(p) for p in sorted(log_dir.glob('*.prof')))} "
            "(python -m pstats FILE, then: sort tottime, stats 25)"
        )
    console.print(f"Redis {urlunsplit(urlsplit(redis_base))} db {cfg.db}; worker logs in {log_dir}")
    if interrupted:
        console.print("[red]interrupted: the table shows the systems that finished; workers were stopped[/red]")
        return 130
    return 0 if results and all(m.ok for m in results) else 1
