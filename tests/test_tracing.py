"""OpenTelemetry: a job's trace continues the trace of the request that enqueued it, and its SQL is inside it.

Spans go to an in-memory exporter; the API runs in process (httpx's ASGI transport) and so does the worker (our
engine in burst mode), against the real PostgreSQL and Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis

from salesdash import tracing
from tests.conftest import wait_for
from worker import jobstore
from worker.records import JobPayload


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()


async def _run_analytics_worker_until_idle() -> None:
    from worker import analytics
    from worker.engine import create_worker

    worker = create_worker(analytics.Settings, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def _ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def _attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def _one(spans: list[ReadableSpan], what: str, **match: Any) -> ReadableSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {what} span, got {[s.name for s in found]}"
    return found[0]


async def test_job_spans_continue_the_request_trace_and_hold_its_sql(
    spans: InMemorySpanExporter, clean_redis: Redis, db: asyncpg.Pool, auth: dict[str, dict[str, str]]
) -> None:
    from api.main import create_app

    app = create_app()  # after install(): the app gets its request spans
    app.state.db, app.state.redis = db, clean_redis
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        accepted = await http.post(
            "/jobs", json={"task_name": "refresh_realtime_materialized_views"}, headers=auth["trigger"]
        )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["task_id"]
    payload = jobstore.deserialize_json(await clean_redis.get(jobstore.job_key(job_id)))
    assert payload["trace"]["traceparent"].startswith("00-")  # the context travels in the payload

    await _run_analytics_worker_until_idle()
    finished = list(spans.get_finished_spans())

    request = _one(finished, "request", kind=SpanKind.SERVER)
    enqueue = _one(finished, "enqueue", name="enqueue refresh_realtime_materialized_views")
    run = _one(finished, "job", name="run refresh_realtime_materialized_views")
    trace_id, request_id = _ids(request)
    run_trace, run_id = _ids(run)
    assert _ids(enqueue)[0] == trace_id and _parent(enqueue) == request_id
    assert run_trace == trace_id, "the job's span is not in the request's trace"
    assert _parent(run) == _ids(enqueue)[1] and run.kind == SpanKind.CONSUMER
    assert _attr(run, "messaging.message.id") == job_id and _attr(run, "salesdash.status") == "complete"

    sql = [s for s in finished if _attr(s, "db.system") == "postgresql" and _ids(s)[0] == trace_id]
    job_sql = [s for s in sql if _parent(s) == run_id]
    assert job_sql, "the job ran no traced SQL"
    assert all(
        (run.start_time or 0) <= (s.start_time or 0) and (s.end_time or 0) <= (run.end_time or 0) for s in job_sql
    )
    # every other SQL span of the trace is the request's own (the token lookup), not a stray
    assert {_parent(s) for s in sql} <= {run_id, request_id}


async def test_a_failed_try_marks_its_span(spans: InMemorySpanExporter, clean_redis: Redis) -> None:
    """A payload whose arguments the task refuses fails; its span says so (and, enqueued without a trace, it is
    a trace of its own)."""
    now = jobstore.now_ms()
    job = JobPayload(
        jobstore.new_job_id(), "refresh_realtime_materialized_views", [], {"x": 1}, "analytics", 5, now, now
    )
    assert await jobstore.enqueue(clean_redis, job)
    await _run_analytics_worker_until_idle()
    run = _one(list(spans.get_finished_spans()), "job", name="run refresh_realtime_materialized_views")
    assert run.parent is None
    assert _attr(run, "salesdash.status") == "failed" and not run.status.is_ok
    assert "x" in (run.status.description or "")


class _Collector(ThreadingHTTPServer):
    """A local OTLP/HTTP receiver: keeps the spans of every export request (protobuf) it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []  # (service name, span) pairs
        super().__init__(("127.0.0.1", 0), _Receive)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Receive(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:  # noqa: N802  # http.server's naming
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                self.server.spans += [(service, span) for span in scope_spans.spans]
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_a_worker_process_exports_over_otlp_and_continues_the_payloads_trace(
    collector: _Collector, clean_redis: Redis, spawn_worker: Any
) -> None:
    """A real worker process with OTEL_EXPORTER_OTLP_ENDPOINT set: the trace context written into the payload
    (here by hand, as another process's enqueue would) is continued across the process boundary and exported."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    spawn_worker("worker.analytics.Settings", extra_env=env)
    trace_id, parent_id = "4bf92f3577b34a4736a2ff2a1f4b1f2a", "00f067aa0ba902b7"
    now = jobstore.now_ms()
    job = JobPayload(
        jobstore.new_job_id(),
        "refresh_realtime_materialized_views",
        [],
        {},
        "analytics",
        5,
        now,
        now,
        trace={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert await jobstore.enqueue(clean_redis, job)

    async def exported_run() -> Any:
        return next((s for _, s in collector.spans if s.name == "run refresh_realtime_materialized_views"), None)

    run = await wait_for(exported_run, timeout=60)
    assert run.trace_id.hex() == trace_id and run.parent_span_id.hex() == parent_id
    services = {service for service, s in collector.spans if s.span_id == run.span_id}
    assert services == {"salesdash-worker-analytics"}

    async def job_sql() -> list[Any]:
        return [s for _, s in collector.spans if s.parent_span_id == run.span_id]

    children = await wait_for(job_sql, timeout=10)
    assert all(s.trace_id == run.trace_id for s in children)
    assert any(a.key == "db.system" and a.value.string_value == "postgresql" for s in children for a in s.attributes)


def test_off_by_default_and_payloads_unchanged() -> None:
    assert not tracing.enabled() and tracing.carrier() is None
    with tracing.enqueue_span("t", "q") as span, tracing.job_span("t", "id", "q", 1, None) as job_span:
        assert span is None and job_span is None
    now = jobstore.now_ms()
    job = JobPayload("id", "t", [], {}, "q", 5, now, now)
    assert "trace" not in jobstore.encode_payload(job)  # a payload is exactly what it was before tracing


def test_a_payload_trace_is_read_back_and_checked() -> None:
    now = jobstore.now_ms()
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    job = JobPayload("id", "t", [], {}, "q", 5, now, now, trace=carrier)
    assert jobstore.decode_payload("id", jobstore.encode_payload(job), "q").trace == carrier
    bad = {**jobstore.encode_payload(job), "trace": {"traceparent": 1}}
    with pytest.raises(jobstore.BadPayload, match="'trace' must be a JSON object of strings"):
        jobstore.decode_payload("id", bad, "q")
