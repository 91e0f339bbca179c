"""Bench worker and client for SAQ 0.26 (Redis queue). Runs only with .venv-bench-saq's python, which bench/queue.py
creates (saq[redis,hiredis]==0.26.*: SAQ's redis-py is newer than the one arq 0.28 allows). Driven by bench/queue.py.

    worker: .venv-bench-saq/bin/python -m saq bench._queue_saq.settings [-v]   (BENCH_CONCURRENCY jobs at a time)
    client: .venv-bench-saq/bin/python -m bench._queue_saq                    (JSON lines, see bench/_queue_client.py)

Jobs are stored as `saq:job:benchq:<key>` (the whole job, its status and result) for an hour, like arq's and
Celery's results; the drain's jobs get the bench's ids as their keys. A job leaves the `saq:benchq:incomplete`
sorted set in the MULTI that stores it as complete, so the driver counts that set to see what is unfinished.

One change from SAQ's defaults: the stuck-job sweep runs every hour instead of every 60 s. The sweep treats every
job in the active list whose stored status is not yet `active` as stuck, and a job the worker has just moved there
(BLMOVE) but not yet marked active is such a job: it gets aborted under the worker's feet and ends `aborted` or
`aborting` although it ran (seen here with a 1 s sweep: 1 of 5,000 jobs). The bench's freeze makes that window
huge (20 or 100 jobs sit there for the whole enqueue), so with the default a drain fails its result check
whenever a sweep falls due at the release. The sweep SAQ runs when a worker starts is kept; the driver waits for it
before the warm-up (see SaqBench.started).
"""

from __future__ import annotations

import asyncio
import os
import time
from importlib.metadata import version
from typing import Any

from saq import Queue
from saq.job import TERMINAL_STATUSES, Status

QUEUE = "benchq"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "20"))
RESULT_TTL_S = 3600
SWEEP_S = 3600  # SAQ's default is 60 s; see the module docstring
ENQUEUE_CONCURRENCY = 32  # like the driver's own clients
POLL_S = 0.001  # the round trip polls the job every 1 ms, like arq's Job.result(poll_delay=0.001)
RTT_TIMEOUT_S = 10.0


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def ping(ctx: dict[str, Any]) -> None:
    return None


def settings() -> dict[str, Any]:
    """`saq bench._queue_saq.settings`: SAQ calls a callable settings object, so the queue is made in the worker."""
    return {
        "queue": Queue.from_url(REDIS_URL, name=QUEUE),
        "functions": [noop, ping],
        "concurrency": CONCURRENCY,
        "timers": {"sweep": SWEEP_S},
    }


class SaqClient:
    def __init__(self) -> None:
        self.queue = Queue.from_url(REDIS_URL, name=QUEUE)

    async def hello(self) -> str:
        return ", ".join(f"{p} {version(p)}" for p in ("saq", "redis", "hiredis"))

    async def enqueue(self, task: str, ids: list[str]) -> None:
        from bench._queue_client import batches

        for chunk in batches(ids, ENQUEUE_CONCURRENCY):
            jobs = await asyncio.gather(*(self.queue.enqueue(task, key=i, ttl=RESULT_TTL_S) for i in chunk))
            if any(job is None for job in jobs):
                raise RuntimeError(f"SAQ refused {sum(job is None for job in jobs)} jobs (key already queued)")

    async def roundtrip(self) -> None:
        job = await self.queue.enqueue("ping", ttl=RESULT_TTL_S)
        assert job is not None
        deadline = time.perf_counter() + RTT_TIMEOUT_S
        while (seen := await self.queue.job(job.key)) is None or seen.status not in TERMINAL_STATUSES:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"round trip: job not finished within {RTT_TIMEOUT_S:.0f} s")
            await asyncio.sleep(POLL_S)
        if seen.status != Status.COMPLETE:
            raise RuntimeError(f"round trip: ping ended {seen.status}: {seen.error}")

    async def close(self) -> None:
        await self.queue.disconnect()


async def _client() -> SaqClient:
    client = SaqClient()
    await client.queue.connect()
    return client


if __name__ == "__main__":
    from bench._queue_client import serve

    serve(_client)
