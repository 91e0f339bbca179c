"""Fleet-wide job metrics: each worker adds its counts into one Redis hash about once a second; the API's
`/metrics` renders that hash (plus live queue depths and worker counts) as Prometheus text. Any worker on
any host contributes, and a scrape never depends on which process it reaches."""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from redis.asyncio import Redis

from worker import jobstore as js

METRICS_KEY = js.METRICS_KEY
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    math.inf,
)


def _field(*parts: str) -> str:
    return json.dumps(parts)


class MetricsBuffer:
    """Counts kept in process between flushes. Observations land in one bucket each (found by bisect); the
    flush turns them into Prometheus's cumulative buckets, so the job path does O(1) work per observation."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self._buckets: dict[tuple[str, ...], list[int]] = {}
        self._fields: dict[tuple[str, ...], str] = {}

    def _name(self, *parts: str) -> str:
        name = self._fields.get(parts)
        if name is None:
            name = self._fields[parts] = _field(*parts)
        return name

    def task_event(self, task: str, queue: str, status: str) -> None:
        self.values[self._name("total", task, queue, status)] += 1

    def duration(self, task: str, queue: str, seconds: float) -> None:
        self._observe(("duration", task, queue), seconds)

    def queue_wait(self, queue: str, seconds: float) -> None:
        self._observe(("wait", queue), seconds)

    def _observe(self, labels: tuple[str, ...], seconds: float) -> None:
        counts = self._buckets.get(labels)
        if counts is None:
            counts = self._buckets[labels] = [0] * len(DURATION_BUCKETS)
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.values[self._name(*labels, "sum")] += seconds
        self.values[self._name(*labels, "count")] += 1

    def _fold_buckets(self) -> None:
        for labels, counts in self._buckets.items():
            running = 0
            for bound, n in zip(DURATION_BUCKETS, counts, strict=True):
                running += n
                if running:
                    self.values[self._name(*labels, "bucket", _le(bound))] += running
        self._buckets.clear()

    async def flush(self, redis: Redis) -> None:
        self._fold_buckets()
        if not self.values:
            return
        pending, self.values = self.values, defaultdict(float)
        try:
            async with redis.pipeline(transaction=True) as pipe:
                for name, amount in pending.items():
                    pipe.hincrbyfloat(METRICS_KEY, name, amount)
                await pipe.execute()
        except BaseException:
            for name, amount in pending.items():
                self.values[name] += amount
            raise


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def families(
    raw: dict[bytes, bytes],
    depths: dict[str, int],
    workers: dict[str, int],
    oldest_waits: dict[str, float] | None = None,
) -> Iterator[Metric]:
    """Prometheus metric families from the metrics hash and live gauges."""
    total = CounterMetricFamily(
        "salesdash_task",
        "Job events by task, queue and status (started, success, failure, retry, aborted)",
        labels=["task_name", "queue", "status"],
    )
    histograms: dict[tuple[str, ...], dict[str, float]] = {}
    for key, value in raw.items():
        parts = json.loads(key)
        if parts[0] == "total":
            total.add_metric(parts[1:], float(value))
        else:
            kind_labels, rest = _split_series(parts)
            histograms.setdefault(kind_labels, {})["|".join(rest)] = float(value)
    yield total
    duration = HistogramMetricFamily("salesdash_task_duration_seconds", "Job run time", labels=["task_name", "queue"])
    wait = HistogramMetricFamily("salesdash_task_queue_wait_seconds", "Time from due to started", labels=["queue"])
    for labels, series in sorted(histograms.items()):
        family = duration if labels[0] == "duration" else wait
        buckets = [(_le(b), series.get(f"bucket|{_le(b)}", 0.0)) for b in DURATION_BUCKETS]
        family.add_metric(list(labels[1:]), buckets, series.get("sum", 0.0))
    yield duration
    yield wait
    depth = GaugeMetricFamily("salesdash_queue_depth", "Jobs waiting to start", labels=["queue"])
    for queue, n in sorted(depths.items()):
        depth.add_metric([queue], n)
    yield depth
    alive = GaugeMetricFamily("salesdash_workers", "Worker processes alive", labels=["queue"])
    for queue, n in sorted(workers.items()):
        alive.add_metric([queue], n)
    yield alive
    oldest = GaugeMetricFamily(
        "salesdash_queue_oldest_job_age_seconds",
        "How long the longest-waiting due job has waited (0: none)",
        labels=["queue"],
    )
    for queue, seconds in sorted((oldest_waits or {}).items()):
        oldest.add_metric([queue], seconds)
    yield oldest


def _split_series(parts: list[str]) -> tuple[tuple[str, ...], list[str]]:
    for i, part in enumerate(parts):
        if part in ("bucket", "sum", "count"):
            return tuple(parts[:i]), parts[i:]
    raise ValueError(f"malformed metrics field {parts!r}")
