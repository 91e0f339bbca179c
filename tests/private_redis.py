"""Private Redis servers for fault tests and bench/chaos.py: plain, AOF, or a master with replicas under three
Sentinels (`redis-server --sentinel`, the binary tests/private_servers.py picks), each on a loopback port of its
own in a temporary directory, so a test can kill -9 them at will without touching the machine's Redis."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as sync_redis

from tests.private_servers import _redis_server, free_port

SERVICE = "sdmaster"


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sync_redis.RedisError, OSError, RuntimeError, StopIteration):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout}s")


@dataclass
class RedisProc:
    """One redis-server (or Sentinel) process; `kill()` is SIGKILL, `start()` brings it back on the same port."""

    name: str
    port: int
    workdir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProc:
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: self.client().ping(), 20, f"{self.name} on port {self.port} answering")
        return self

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def replication(self) -> dict[str, Any]:
        info: dict[str, Any] = self.client().info("replication")  # type: ignore[assignment]
        return info

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_server(workdir: Path, name: str, *, aof: bool = False, replica_of: int | None = None) -> RedisProc:
    """A redis-server on a free port (not yet started); AOF with `appendfsync everysec`, as compose runs it. Its
    settings are in a config file of its own: Sentinel rewrites it when it changes the server's role, so a
    server restarted after a failover comes back as what it was (a replica), not as a second master."""
    port = free_port()
    data = workdir / name
    data.mkdir(parents=True, exist_ok=True)
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {data}", 'save ""']
    lines += ["repl-diskless-sync-delay 0"]  # a replica (re)joining syncs at once, not 5 s later
    lines += ["appendonly yes", "appendfsync everysec"] if aof else ["appendonly no"]
    if replica_of is not None:
        lines += [f"replicaof 127.0.0.1 {replica_of}"]
    conf = workdir / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    return RedisProc(name, port, workdir, [_redis_server(), str(conf)])


def sentinel_server(workdir: Path, name: str, master_port: int, *, down_after_ms: int) -> RedisProc:
    port = free_port()
    conf = workdir / f"{name}.conf"  # a Sentinel rewrites its config file: it must be its own and writable
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
        f"sentinel failover-timeout {SERVICE} {max(down_after_ms * 3, 3000)}\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return RedisProc(name, port, workdir, [_redis_server(), str(conf), "--sentinel"])


@dataclass
class SentinelCluster:
    master: RedisProc  # the server that was master at start; `current_master()` says who is now
    replicas: list[RedisProc]
    sentinels: list[RedisProc]
    failovers: int = 0
    servers: list[RedisProc] = field(default_factory=list)

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def named_masters(self) -> set[int]:
        """The master's port according to each Sentinel that answers (more than one while they disagree)."""
        ports = set()
        for s in self.sentinels:
            with contextlib.suppress(sync_redis.RedisError):
                addr = s.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if addr:
                    ports.add(int(addr[1]))
        return ports

    def master_port(self) -> int:
        ports = self.named_masters()
        if len(ports) != 1:
            raise RuntimeError(f"the Sentinels name {sorted(ports) or 'no'} masters")
        return ports.pop()

    def current_master(self) -> RedisProc:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def wait_ready(self, timeout: float = 30) -> None:
        """Settled: every Sentinel names the same master, which says it is one, with every replica in sync, and
        every Sentinel sees the others and the replicas (a failover needs both)."""
        want = len(self.servers) - 1

        def settled() -> bool:
            master = self.current_master()
            return (
                master.replication()["role"] == "master"
                and self._replicas_online(master) >= want
                and all(self._sentinel_sees_all(s, want) for s in self.sentinels)
            )

        wait_until(settled, timeout, "a settled cluster")

    @staticmethod
    def _replicas_online(master: RedisProc) -> int:
        info = master.replication()  # slave0, slave1, ... are dicts; slave_repl_offset and the like are not
        return sum(1 for v in info.values() if isinstance(v, dict) and v.get("state") == "online")

    def _sentinel_sees_all(self, s: RedisProc, replicas: int) -> bool:
        info = dict(zip(*[iter(s.client().execute_command("SENTINEL", "MASTER", SERVICE))] * 2, strict=True))
        return int(info[b"num-other-sentinels"]) >= len(self.sentinels) - 1 and int(info[b"num-slaves"]) >= replicas

    def kill_master(self) -> tuple[RedisProc, float]:
        """SIGKILL the current master; returns it and when (monotonic)."""
        master = self.current_master()
        master.kill()
        return master, time.monotonic()

    def wait_failover(self, old_port: int, timeout: float = 30) -> float:
        """Block until the Sentinels name a new master and it says it is one; returns when (monotonic)."""

        def promoted() -> bool:
            master = self.current_master()  # every Sentinel agrees
            return master.port != old_port and master.replication()["role"] == "master"

        wait_until(promoted, timeout, "failover")
        self.failovers += 1
        return time.monotonic()

    def close(self) -> None:
        for p in [*self.sentinels, *self.servers]:
            p.kill()


@contextlib.contextmanager
def sentinel_cluster(
    workdir: Path, *, replicas: int = 1, down_after_ms: int = 1000, aof: bool = False
) -> Iterator[SentinelCluster]:
    """A master, `replicas` replicas and three Sentinels (quorum 2), started and linked; all killed on exit."""
    master = redis_server(workdir, "master", aof=aof)
    cluster = SentinelCluster(master, [], [])
    try:
        cluster.servers.append(master.start())
        for i in range(replicas):
            replica = redis_server(workdir, f"replica{i}", aof=aof, replica_of=master.port)
            cluster.replicas.append(replica)
            cluster.servers.append(replica.start())
        for i in range(3):
            cluster.sentinels.append(
                sentinel_server(workdir, f"sentinel{i}", master.port, down_after_ms=down_after_ms).start()
            )
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.close()
