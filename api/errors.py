"""Every error answer of the HTTP API has one shape, `ErrorBody` (docs/rest.md#errors): `detail` names the field
or resource and the problem, `code` says which kind of refusal it is. This module owns that shape, the
handlers that produce it, the masking of unexpected exceptions, and the 503 for an unreachable PostgreSQL or
Redis (`DependencyGuard`, an ASGI middleware around every route, GraphQL included)."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal

import asyncpg
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salesdash.auth import AuthError
from salesdash.config import get_settings

log = logging.getLogger("salesdash.api")
request_id: ContextVar[str] = ContextVar("request_id", default="-")
Dependency = Literal["postgres", "redis"]
DEPENDENCY_NAMES: dict[str, str] = {"postgres": "PostgreSQL", "redis": "Redis"}

CODES: dict[int, str] = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID",
    429: "RATE_LIMITED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class FieldProblem(BaseModel):
    field: str = Field(description="where: the body field, query or path parameter (dotted for nested ones)")
    problem: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what was refused and why, naming the field or the resource")
    code: str = Field(description="UNAUTHENTICATED, FORBIDDEN, NOT_FOUND, CONFLICT, INVALID, UNAVAILABLE, …")
    problems: list[FieldProblem] | None = Field(default=None, description="422 only: one entry per bad field")
    dependency: Dependency | None = Field(default=None, description="503 only: which server is unreachable")
    request_id: str | None = Field(default=None, description="500 only: look it up in the server log")


DESCRIPTIONS: dict[int, str] = {
    401: "no token, a malformed header, an unknown, expired or revoked token",
    403: "the token's scope is too small",
    404: "no such resource",
    409: "the resource is in the wrong state for this",
    413: "the request body is larger than SALESDASH_API_MAX_BODY_BYTES",
    422: "the input is malformed or out of range; `problems` names each field",
    503: "PostgreSQL or Redis is unreachable (`dependency` says which); retry after `Retry-After` seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these status codes, each answering an ErrorBody."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS.get(code, CODES.get(code, ""))} for code in codes}


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = ErrorBody(detail=detail, code=CODES.get(status, "ERROR"), **extra)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


# ---- validation: FastAPI's list of errors, as one sentence naming each field -------------------------------------
def _field(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts[:1] == ["header"] and len(parts) == 2:  # as the client writes it: Idempotency-Key
        return "-".join(word.capitalize() for word in parts[1].split("-"))
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:] or parts  # "body" alone: the body as a whole (not JSON, not an object)
    return ".".join(parts)


def _problem(error: dict[str, Any]) -> str:
    if error.get("type") == "json_invalid":
        return f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    return str(error.get("msg", "invalid"))


def validation_problems(errors: Iterable[dict[str, Any]]) -> list[FieldProblem]:
    return [FieldProblem(field=_field(e.get("loc", ())), problem=_problem(e)) for e in errors]


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = validation_problems(exc.errors())
    detail = "; ".join(f"{p.field}: {p.problem}" for p in problems) or "invalid request"
    return error_response(422, detail, problems=problems)


_UNPARSABLE_BODY = "There was an error parsing the body"  # FastAPI's 400 for a body that is not UTF-8 (or form)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:  # the same refusal as any other bad body
        problem = FieldProblem(field="body", problem="not valid JSON or form data (is it UTF-8?)")
        return error_response(422, f"{problem.field}: {problem.problem}", problems=[problem])
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return error_response(exc.status_code, str(exc), headers=headers)


def openapi_with_error_bodies(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the 422 it adds to any route with parameters describing the ErrorBody our
    handler answers (FastAPI would document its own list-shaped body, which this API never sends)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for path in document.get("paths", {}).values():
            for operation in path.values():
                answer = operation.get("responses", {}).get("422")
                if answer and "HTTPValidationError" in str(answer):
                    operation["responses"]["422"] = {
                        "description": DESCRIPTIONS[422],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    }
        document["paths"].get("/healthz", {}).get("get", {}).get("responses", {}).pop("503", None)  # needs nothing
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
    return app.openapi_schema


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(AuthError, _auth_error)  # type: ignore[arg-type]
    app.add_middleware(DependencyGuard)
    app.openapi = lambda: openapi_with_error_bodies(app)  # type: ignore[method-assign]


# ---- dependencies down ---------------------------------------------------------------------------------------------
class DependencyDownError(Exception):
    """Raised where an error was caught and turned into something else (GraphQL errors): which server is down."""

    def __init__(self, dependency: Dependency) -> None:
        super().__init__(f"{DEPENDENCY_NAMES[dependency]} is unreachable")
        self.dependency: Dependency = dependency


_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_POSTGRES_DOWN = (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)


def _raised_inside(tb: TracebackType | None) -> Dependency | None:
    """A bare OSError or TimeoutError (asyncpg's connect raises them as they are): which client it came out of."""
    found: Dependency | None = None
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith("asyncpg"):
            found = "postgres"
        elif module.startswith(("redis", "arq")):
            found = "redis"
        tb = tb.tb_next
    return found


def unreachable_dependency(exc: BaseException) -> Dependency | None:
    """Which server an exception says is unreachable; None for any other exception."""
    for link in _chain(exc):
        if isinstance(link, DependencyDownError):
            return link.dependency
        if isinstance(link, _REDIS_DOWN):
            return "redis"
        if isinstance(link, _POSTGRES_DOWN):
            return "postgres"
        if isinstance(link, OSError | TimeoutError) and (where := _raised_inside(link.__traceback__)):
            return where
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def unavailable(dependency: Dependency) -> JSONResponse:
    name = DEPENDENCY_NAMES[dependency]
    retry_after = str(get_settings().api_retry_after_s)
    detail = f"{name} is unreachable; try again in {retry_after} s"
    return error_response(503, detail, headers={"Retry-After": retry_after}, dependency=dependency)


def log_unexpected(exc: BaseException, where: str) -> str:
    """Log an unexpected exception with its traceback under a fresh id, which the client gets instead."""
    rid = request_id.get()
    log.error(
        "unexpected error in %s: %s",
        where,
        exc,
        extra={"request_id": rid, "traceback": "".join(traceback.format_exception(exc))},
    )
    return rid


def new_request_id() -> str:
    """The id an answer carries in `x-request-id` (and a 500 in its body, the log with its traceback)."""
    return os.urandom(8).hex()


class DependencyGuard:
    """Around every route: PostgreSQL or Redis unreachable → 503 naming which, with Retry-After; any other
    exception → 500 with a request id (the traceback goes to the log, never to the client)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_id.set(new_request_id())
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", request_id.get().encode()))
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:
                raise  # the answer is half sent: nothing better to do than cut it
            dependency = unreachable_dependency(exc)
            if dependency is not None:
                log.warning("%s unreachable: %s", DEPENDENCY_NAMES[dependency], exc)
                response = unavailable(dependency)
            else:
                rid = log_unexpected(exc, f"{scope.get('method')} {scope.get('path')}")
                response = error_response(500, "internal error; the server log has the details", request_id=rid)
            await response(scope, receive, tracked_send)
        finally:
            request_id.reset(token)
