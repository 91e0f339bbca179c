"""Bench worker and client for streaQ 7 (Redis streams, coredis). Runs only with .venv-bench-streaq's python, which
bench/queue.py creates (streaq>=7,<8: it needs coredis and anyio, not arq's redis-py). Driven by bench/queue.py.

    worker: .venv-bench-streaq/bin/python -m streaq run bench._queue_streaq:worker   (BENCH_CONCURRENCY tasks)
    client: .venv-bench-streaq/bin/python -m bench._queue_streaq                    (JSON lines, see _queue_client)

streaQ's CLI always logs at INFO; with the bench's --log-level WARNING the tasks are registered `silent=True`,
streaQ's own switch for its per-task log lines. Results are kept an hour (`ttl`), like arq's and Celery's. The
drain's tasks get the bench's ids as task ids (`Task.id`, which streaQ itself sets for cron tasks). A task's
stream entry is XDEL'd in the MULTI that stores its result, so the driver counts the stream (XLEN) to see what
is unfinished.

The round trip polls `Task.status()` every 1 ms. streaQ's own way to wait, `Task.result()`, is pushed (it
subscribes to the task's channel, then checks for the result), but with coredis 6.9 each call takes >= 100 ms:
leaving coredis' pub/sub context always waits out its `unsubscription_timeout` (0.1 s) after the result has
arrived, so Task.result() would measure that timeout, not the queue.

Note: streaQ keeps its Lua code as a Redis *function library* named `streaq` (FUNCTION LOAD REPLACE, server-wide,
not per database); the driver puts the server's previous state of that library back afterwards.
"""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack
from importlib.metadata import version
from typing import Any

import anyio
from streaq import TaskStatus, Worker

QUEUE = "benchq"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "20"))
SILENT = os.environ.get("BENCH_LOG_LEVEL", "INFO").upper() != "INFO"
RESULT_TTL_S = 3600
ENQUEUE_BATCH = 1000  # Worker.enqueue_many: one pipeline per batch
POLL_S = 0.001  # the round trip polls every 1 ms, like arq's Job.result(poll_delay=0.001)
RTT_TIMEOUT_S = 10.0

worker: Worker[Any] = Worker(redis_url=REDIS_URL, queue_name=QUEUE, concurrency=CONCURRENCY)


@worker.task(ttl=RESULT_TTL_S, silent=SILENT)
async def noop() -> None:
    return None


@worker.task(ttl=RESULT_TTL_S, silent=SILENT)
async def ping() -> None:
    return None


TASKS = {"noop": noop, "ping": ping}


class StreaqClient:
    """The documented client pattern: enqueue and wait inside `async with worker`."""

    def __init__(self) -> None:
        self.stack = AsyncExitStack()

    async def hello(self) -> str:
        return ", ".join(f"{p} {version(p)}" for p in ("streaq", "coredis", "anyio"))

    async def enqueue(self, task: str, ids: list[str]) -> None:
        from bench._queue_client import batches

        for chunk in batches(ids, ENQUEUE_BATCH):
            tasks = [TASKS[task].enqueue() for _ in chunk]
            for t, task_id in zip(tasks, chunk, strict=True):
                t.id = task_id
            await worker.enqueue_many(tasks)

    async def roundtrip(self) -> None:
        """Poll Task.status() every 1 ms (see the module docstring for why not Task.result())."""
        task = await ping.enqueue()
        deadline = time.perf_counter() + RTT_TIMEOUT_S
        while await task.status() != TaskStatus.DONE:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"round trip: task not done within {RTT_TIMEOUT_S:.0f} s")
            await anyio.sleep(POLL_S)

    async def close(self) -> None:
        await self.stack.aclose()


async def _client() -> StreaqClient:
    client = StreaqClient()
    await client.stack.enter_async_context(worker)
    return client


if __name__ == "__main__":
    from bench._queue_client import serve

    serve(_client)
