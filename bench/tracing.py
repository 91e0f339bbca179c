"""Tracing's cost on the job path: our engine draining no-op jobs with tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT,
the default) and on (the SDK with a batch processor whose exporter drops the spans, so the network is not what
is measured), in alternating runs in one process; plus what the off path's helpers cost per job.

    .venv/bin/python bench/tracing.py                     # 5,000 jobs per run, 3 runs of each mode
    .venv/bin/python bench/tracing.py --jobs 2000 --repeat 5

Needs Redis (REDIS_URL, default redis://127.0.0.1:6379/0); uses database --redis-db (default 12, a bench database
as for bench/queue.py) and FLUSHDBs it.
No PostgreSQL: the bench worker has no database pool, so no history is written (what is measured is the engine's
per-job work, where the tracing hooks are). Each run: enqueue --jobs jobs untimed (each inside an enqueue span
and carrying the trace context when tracing is on, as `worker.client.enqueue_task` does), then time an
in-process burst worker (max_jobs=20) from start to an empty queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import timeit
from collections.abc import Sequence
from typing import Any

# run as `python bench/tracing.py`: bench/ is sys.path[0], and bench/queue.py would shadow the stdlib `queue`
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
sys.path.insert(0, os.path.dirname(_here))

from arq.connections import RedisSettings, create_pool  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from salesdash import tracing  # noqa: E402
from worker import jobstore as js  # noqa: E402
from worker.engine import create_worker  # noqa: E402
from worker.records import JobPayload  # noqa: E402

QUEUE = "benchtrace"


async def noop(ctx: dict[str, Any]) -> None:
    return None


class _Drop(SpanExporter):
    """Takes spans and throws them away: the SDK's work is measured, not a collector's."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _settings(redis_settings: RedisSettings) -> type:
    return type(
        "Settings",
        (),
        {
            "queue_name": js.queue_name(QUEUE),
            "functions": [noop],
            "redis_settings": redis_settings,
            "job_serializer": js.serialize_json,
            "job_deserializer": js.deserialize_json,
            "max_jobs": 20,
            "keep_result": 60,
            "health_check_interval": 30,
        },
    )


async def _enqueue(redis: Any, jobs: int) -> None:
    for _ in range(jobs):
        with tracing.enqueue_span("noop", QUEUE):
            now = js.now_ms()
            job = JobPayload(js.new_job_id(), "noop", [], {}, QUEUE, 5, now, now, trace=tracing.carrier())
            await js.enqueue(redis, job)


async def _run(redis_settings: RedisSettings, jobs: int, traced: bool) -> tuple[float, int]:
    """Drain seconds, spans exported."""
    exporter = _Drop()
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracing.install(provider)
    try:
        redis = await create_pool(redis_settings)
        await redis.flushdb()
        await _enqueue(redis, jobs)
        await redis.aclose()
        worker = create_worker(_settings(redis_settings), burst=True, handle_signals=False)
        started = time.perf_counter()
        try:
            await worker.main()
        finally:
            drained = time.perf_counter() - started
            await worker.close()
    finally:
        if traced:
            tracing.uninstall()
    return drained, exporter.spans


def _off_path_ns() -> float:
    """What the tracing hooks cost one job when tracing is off: the enqueue's span and carrier, the run's span
    and its end mark."""
    assert not tracing.enabled()

    def one_job() -> None:
        with tracing.enqueue_span("noop", QUEUE):
            tracing.carrier()
        with tracing.job_span("noop", "id", QUEUE, 1, None) as span:
            tracing.end_job_span(span, "complete", None)

    n = 200_000
    return min(timeit.repeat(one_job, number=n, repeat=5)) / n * 1e9


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args(argv)
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    redis_settings = RedisSettings.from_dsn(f"{base}/{args.redis_db}")
    runs: dict[bool, list[float]] = {False: [], True: []}
    exported = 0
    await _run(redis_settings, 200, False)  # warm-up: imports, script loading
    for _ in range(args.repeat):
        for traced in (False, True):
            seconds, spans = await _run(redis_settings, args.jobs, traced)
            runs[traced].append(seconds)
            exported += spans
    off_ns = _off_path_ns()
    console = Console()
    table = Table(title=f"{args.jobs:,} no-op jobs per run, {args.repeat} alternating runs per mode, one worker")
    for column in ("tracing", "jobs/s (median)", "jobs/s (min–max)", "µs per job (median)"):
        table.add_column(column)
    for traced, label in ((False, "off (default)"), (True, "on, spans dropped by the exporter")):
        rates = [args.jobs / s for s in runs[traced]]
        per_job = statistics.median(runs[traced]) / args.jobs * 1e6
        table.add_row(
            label, f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}–{max(rates):,.0f}", f"{per_job:.0f}"
        )
    console.print(table)
    off_share = off_ns / 1000 / (statistics.median(runs[False]) / args.jobs * 1e6)
    ratio = statistics.median(runs[True]) / statistics.median(runs[False])
    made = 2 * args.jobs * args.repeat
    console.print(f"off path: the tracing hooks cost {off_ns:.0f} ns per job ({off_share:.2%} of a job's time off)")
    console.print(f"on/off per-job time (medians): {ratio:.2f}")
    console.print(f"spans exported while on: {exported:,} of {made:,} made (the batch queue, 2,048, drops overflow)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
