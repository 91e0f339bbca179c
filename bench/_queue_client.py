"""The client side of a bench system that runs in its own virtualenv (SAQ, streaQ): bench/queue.py cannot import
those libraries (their dependencies clash with arq's), so it runs `<venv>/bin/python -m bench._queue_<system>`,
which calls `serve()` here, and talks to it in JSON lines over stdin/stdout.

Standard library only: this module is imported inside the other venvs.

    request                                            reply
    {"op": "hello"}                                    {"ok": "saq 0.26.4, redis 7.1.0, ..."}
    {"op": "enqueue", "task": "noop", "ids": [...]}    {"ok": null}           (every id enqueued, none skipped)
    {"op": "roundtrips", "n": 220}                     {"ok": [ms, ms, ...]}  (sequential, timed in this process)
    anything failing                                   {"error": "TypeName: message"}

End of input closes the client. Round trips are timed here, not in the driver, so the pipe to the driver is not
part of the measured time: each one runs from just before the enqueue call until the client sees the job
finished, like the driver does for the systems it runs itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, Protocol


class Client(Protocol):
    async def hello(self) -> str: ...

    async def enqueue(self, task: str, ids: list[str]) -> None: ...

    async def roundtrip(self) -> None: ...

    async def close(self) -> None: ...


def batches(ids: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


async def time_roundtrips(client: Client, n: int) -> list[float]:
    times: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await client.roundtrip()
        times.append((time.perf_counter() - t) * 1000)
    return times


async def _handle(client: Client, request: dict[str, Any]) -> Any:
    op = request.get("op")
    if op == "hello":
        return await client.hello()
    if op == "enqueue":
        await client.enqueue(str(request["task"]), [str(i) for i in request["ids"]])
        return None
    if op == "roundtrips":
        return await time_roundtrips(client, int(request["n"]))
    raise ValueError(f"unknown op {op!r}")


def _protocol_streams() -> tuple[IO[str], IO[str]]:
    """The real stdout carries the protocol; anything a library prints goes to stderr (the client's log)."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sys.stdin, out


async def _serve(make: Callable[[], Awaitable[Client]]) -> None:
    requests, replies = _protocol_streams()
    client = await make()
    try:
        while line := await asyncio.to_thread(requests.readline):
            try:
                reply: dict[str, Any] = {"ok": await _handle(client, json.loads(line))}
            except Exception as exc:  # reported to the driver, which raises it there
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        await client.close()


def serve(make: Callable[[], Awaitable[Client]]) -> None:
    asyncio.run(_serve(make))
