"""What a Redis Sentinel failover loses, with SALESDASH_ENQUEUE_REPLICA_WAIT_MS off and on; one table.

    .venv/bin/python bench/failover.py [--rounds 3] [--clients 16] [--wait-ms 500]

Each round starts a private master, one replica and three Sentinels on loopback (tests/private_redis.py,
down-after 1 s), runs `--clients` concurrent enqueuers back to back (no worker, so every stored job stays put),
SIGKILLs the master 1.5 s in, keeps enqueueing through the failover and 1 s past it, then counts on the new
master the acknowledged enqueues that are not there. Two scenarios: the replica in sync at the kill (loopback
replication is sub-millisecond), and the replica `--lag-s` behind: it replicates through a relay that holds the
master's stream that long before the kill and then drops the connection with what it held (a stalled or cut
link), which is when asynchronous replication loses acknowledged writes.
"acked" = enqueue returned without error; "reported" = stored but NotReplicatedError raised (the caller was told;
after the failover there is no replica left, so every enqueue is reported until one rejoins); "enqueue/s" =
acknowledged enqueues per second before the kill; "stall s" = kill to the first stored enqueue after it.
The machine's Redis and PostgreSQL are not touched.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/failover.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from redis.asyncio import Redis  # noqa: E402
from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: E402
from redis.exceptions import TimeoutError as RedisTimeoutError  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from salesdash.config import Settings  # noqa: E402
from salesdash.connections import open_redis  # noqa: E402
from tests.private_redis import SentinelCluster, redis_server, sentinel_server  # noqa: E402
from worker import jobstore  # noqa: E402
from worker.records import JobPayload  # noqa: E402

QUEUE = "failoverbench"


class ReplicationLink:
    """A TCP relay the replica replicates through: `hold()` stops passing the master's stream on (a slow or cut
    link), `cut()` drops the connection with whatever it held, as a partition or a lost host would."""

    def __init__(self, master_port: int) -> None:
        self.master_port = master_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, replica_r: asyncio.StreamReader, replica_w: asyncio.StreamWriter) -> None:
        try:
            master_r, master_w = await asyncio.open_connection("127.0.0.1", self.master_port)
        except OSError:  # the master is gone: the replica retries, the Sentinels promote it
            replica_w.close()
            return
        self.writers += [replica_w, master_w]
        await asyncio.gather(self._pipe(replica_r, master_w, False), self._pipe(master_r, replica_w, True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                if held:
                    await self.flowing.wait()
                writer.write(chunk)
                await writer.drain()
        writer.close()

    def hold(self) -> None:
        self.flowing.clear()

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        self.flowing.set()


@dataclass
class Round:
    acked: dict[str, float] = field(default_factory=dict)
    reported: int = 0
    last_reported: float = 0.0
    errors: int = 0
    stop: bool = False
    lost: int = 0
    failover_s: float = 0.0
    stall_s: float = 0.0
    rate: float = 0.0


async def _client(redis: Redis, state: Round, wait_ms: int) -> None:
    while not state.stop:
        now = jobstore.now_ms()
        job = JobPayload(jobstore.new_job_id(), "noop", [], {}, QUEUE, 5, now, now)
        try:
            await jobstore.enqueue(redis, job, replica_wait_ms=wait_ms)
            state.acked[job.id] = time.monotonic()
        except jobstore.NotReplicatedError:
            state.reported += 1
            state.last_reported = time.monotonic()
        except (RedisConnectionError, RedisTimeoutError):
            state.errors += 1
            await asyncio.sleep(0.02)


async def _round(workdir: Path, clients: int, wait_ms: int, lag_s: float) -> Round:
    state = Round()
    master = redis_server(workdir, "master").start()
    link = ReplicationLink(master.port)
    replica = redis_server(workdir, "replica", replica_of=await link.start()).start()
    cluster = SentinelCluster(master, [replica], [], servers=[master, replica])
    try:
        for i in range(3):
            cluster.sentinels.append(sentinel_server(workdir, f"sentinel{i}", master.port, down_after_ms=1000).start())
        await asyncio.to_thread(cluster.wait_ready)
        await _measure(cluster, link, state, clients, wait_ms, lag_s)
    finally:
        cluster.close()
    return state


async def _measure(
    cluster: SentinelCluster, link: ReplicationLink, state: Round, clients: int, wait_ms: int, lag_s: float
) -> None:
    redis = await open_redis(Settings(DATABASE_URL="postgresql://unused@127.0.0.1/unused", REDIS_URL=cluster.url()))
    tasks = [asyncio.create_task(_client(redis, state, wait_ms)) for _ in range(clients)]
    started = time.monotonic()
    await asyncio.sleep(1.5)
    state.rate = len(state.acked) / (time.monotonic() - started)
    if lag_s:  # the link stalls: the master goes on acknowledging writes the replica never gets
        link.hold()
        await asyncio.sleep(lag_s)
    old, killed_at = await asyncio.to_thread(cluster.kill_master)
    link.cut()
    promoted_at = await asyncio.to_thread(cluster.wait_failover, old.port)
    await asyncio.sleep(1.0)
    state.stop = True
    await asyncio.gather(*tasks)
    state.failover_s = promoted_at - killed_at
    after = [t for t in [*state.acked.values(), state.last_reported] if t > killed_at]
    state.stall_s = min(after) - killed_at if after else float("nan")
    ids = list(state.acked)
    present = 0
    for i in range(0, len(ids), 1000):
        present += int(await redis.exists(*[jobstore.job_key(j) for j in ids[i : i + 1000]]))
    state.lost = len(ids) - present
    await redis.aclose(close_connection_pool=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--wait-ms", type=int, default=500)
    parser.add_argument("--lag-s", type=float, default=0.3, help="how far the replica falls behind, 2nd scenario")
    args = parser.parse_args()
    table = Table(title=f"Sentinel failover, {args.clients} enqueuers, master SIGKILLed ({args.rounds} rounds each)")
    for column in ("replica at the kill", "durability", "acked", "lost acked", "reported", "errors", "enqueue/s"):
        table.add_column(column, justify="right")
    table.add_column("failover s", justify="right")
    table.add_column("stall s", justify="right")
    for lag_s in (0.0, args.lag_s):
        for label, wait_ms in (("off", 0), (f"WAIT 1 {args.wait_ms}", args.wait_ms)):
            rounds = [
                await _round(Path(tempfile.mkdtemp(prefix="failover-bench-")), args.clients, wait_ms, lag_s)
                for _ in range(args.rounds)
            ]
            table.add_row(
                f"{lag_s:g} s behind" if lag_s else "in sync",
                label,
                f"{sum(len(r.acked) for r in rounds):,}",
                f"{sum(r.lost for r in rounds):,}",
                f"{sum(r.reported for r in rounds):,}",
                f"{sum(r.errors for r in rounds):,}",
                f"{statistics.median(r.rate for r in rounds):,.0f}",
                f"{statistics.median(r.failover_s for r in rounds):.2f}",
                f"{statistics.median(r.stall_s for r in rounds):.2f}",
            )
    Console(width=150).print(table)


if __name__ == "__main__":
    asyncio.run(main())
