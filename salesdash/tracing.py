"""OpenTelemetry tracing, set up in one place (docs/operations.md#traces).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set: then every process (API, worker) exports its spans over
OTLP/HTTP. A trace runs from the API request through the enqueue into the job's run and its SQL: the enqueue
puts its W3C trace context into the job payload (`JobPayload.trace`), and the worker continues it.

When off, nothing is installed (no middleware, no asyncpg patch, no SDK objects) and each helper below returns
after one test of a module global, so the job path pays nothing measurable (`make bench-tracing`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
NOT_TRACED = ("healthz", "readyz", "metrics")  # probes and scrapes: many, and nothing to see in them

_OFF: AbstractContextManager[None] = nullcontext()  # reusable: what the span helpers return when tracing is off
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def provider() -> TracerProvider | None:
    return _provider


def configure(service: str) -> bool:
    """Export this process's spans over OTLP when an endpoint is configured; True when tracing is on. Called
    once at start by the API and each worker; a second call does nothing."""
    if enabled():
        return True
    if not (os.environ.get(ENDPOINT_ENV) or os.environ.get(TRACES_ENDPOINT_ENV)):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    tracer_provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_* env
    install(tracer_provider)
    return True


def install(tracer_provider: TracerProvider) -> None:
    """Trace with `tracer_provider` (its processors decide where spans go) and trace asyncpg's queries. Tests
    call it with an in-memory exporter; `configure` with the OTLP one."""
    global _provider, _tracer
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    _provider, _tracer = tracer_provider, tracer_provider.get_tracer("salesdash")
    AsyncPGInstrumentor().instrument(tracer_provider=tracer_provider)  # type: ignore[no-untyped-call]


def uninstall() -> None:
    """Back to no tracing (tests): undo the asyncpg patch and flush what was recorded."""
    global _provider, _tracer
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    if _provider is not None:
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        _provider.force_flush()
    _provider, _tracer = None, None


def flush() -> None:
    """Export what is buffered (a stopping process; the SDK also flushes at exit)."""
    if _provider is not None:
        _provider.force_flush()


def instrument_app(app: Any) -> None:
    """A server span per HTTP request of the FastAPI `app` (probes and scrapes excepted), when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls=",".join(NOT_TRACED))


def enqueue_span(task: str, queue: str) -> AbstractContextManager[Span | None]:
    """The span of enqueueing a job: a producer span, child of the current one (the API request's)."""
    if _tracer is None:
        return _OFF
    attributes = {"messaging.system": "salesdash", "messaging.destination.name": queue, "salesdash.task": task}
    return _tracer.start_as_current_span(f"enqueue {task}", kind=SpanKind.PRODUCER, attributes=attributes)


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers, to travel in a job payload; None when not tracing."""
    if _tracer is None:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def job_span(
    task: str, job_id: str, queue: str, attempt: int, parent: Mapping[str, str] | None
) -> AbstractContextManager[Span | None]:
    """The span of one try of a job: a consumer span continuing the trace in `parent` (the payload's carrier),
    or a new trace (a cron tick, a job from arq's client). Its SQL runs inside it and so becomes its children."""
    if _tracer is None:
        return _OFF
    return _job_span(_tracer, task, job_id, queue, attempt, parent)


@contextmanager
def _job_span(
    tracer: trace.Tracer, task: str, job_id: str, queue: str, attempt: int, parent: Mapping[str, str] | None
) -> Iterator[Span]:
    context = propagate.extract(dict(parent)) if parent else None
    attributes: dict[str, str | int] = {
        "messaging.system": "salesdash",
        "messaging.destination.name": queue,
        "messaging.message.id": job_id,
        "salesdash.task": task,
        "salesdash.try": attempt,
    }
    with tracer.start_as_current_span(
        f"run {task}", context=context, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


def end_job_span(span: Span | None, status: str, error: str | None) -> None:
    """Mark a job's span with how the try ended (`complete`, `failed`, `aborted`, `deferred` for a retry)."""
    if span is None:
        return
    span.set_attribute("salesdash.status", status)
    if status in ("failed", "deferred") and error:
        span.set_status(Status(StatusCode.ERROR, error))
