"""GraphQL response memo for dashboard reads: the bytes strawberry answered a dashboard-only query with, served
again without executing it while the cache entries it was built from are still the ones in Redis.

A dashboard query (`{ salesOverview(range: "last_7_days") { revenue } }`) costs strawberry's parse, validation,
execution and JSON encoding on every request, about a millisecond of CPU, for a payload that changes every two
minutes (warm_dashboard_cache). This ASGI middleware, in front of the app, keys the memo by the request body (the
document, its variables and operation name, byte for byte). A body is memoized only when it is one query operation
whose top-level fields are all dashboard fields and strawberry answered it 200 without errors; what is kept is the
response and, per field, the cache entry it was served from (recorded by api.graphql's resolvers).

A memoized body is served when, for this request:
- the caller authenticates with the read scope (the app's TokenVerifier, as every route; a refusal falls through
  to strawberry, which answers it as usual);
- every field's cache key, derived again for this moment (a new local day is a new key), holds in Redis byte for
  byte the entry it was built from (one MGET), and none of them is past its TTL. A memo that passed that check
  less than REVALIDATE_S ago is not checked again (neither its keys nor Redis); one checked less than STALE_S ago
  is answered while one request's look (the only one under way for that memo) runs. A newer entry written by
  warm_dashboard_cache (every two minutes) is answered at most about STALE_S late, and an entry is never answered
  past its TTL. The Redis round trip was about a quarter of a memo hit's CPU; at 100 clients, every request
  waiting for its own look put a tail of hundreds of ms on the answers (bench/analytics.py).
Anything else (a miss, an expired or rewritten entry, another query) goes to strawberry as before.

A hit that needs no waiting (the token in the process's cache, the memo confirmed recently enough) is answered by
MemoFront, in front of the app's whole middleware stack, with the bytes and headers the stack would give it; the
rest (a miss, a hit that must wait for PostgreSQL or Redis) goes through the stack to GraphQLMemo, which shares its
memos.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from graphql import FieldNode, GraphQLError, OperationDefinitionNode, OperationType, parse
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from api.errors import error_response, new_request_id
from api.security import EVERY_ANSWER
from salesdash.auth import AuthError, Scope, require
from salesdash.config import get_settings
from worker import cache, dashboard
from worker.cache import CacheEntry

AsgiScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[AsgiScope, Receive, Send], Awaitable[None]]

RECORDER = "salesdash.graphql_memo"  # the ASGI scope key api.graphql's context finds the recorder under
PATH = "/graphql"
MAX_BODY = 16 * 1024  # larger request bodies are never memoized
MAX_ENTRIES = 256  # distinct bodies remembered; the oldest goes first
REVALIDATE_S = 0.1  # a memo checked against Redis this recently, for the same keys, is served without a look
STALE_S = 1.0  # and one checked this recently is served while the next look is under way
# Top-level fields whose answer is a cache entry and nothing else (api.graphql's DashboardQueries).
DASHBOARD_FIELDS = frozenset(
    {
        "salesOverview",
        "hourlyMetrics",
        "topProducts",
        "topCategories",
        "categoryBreakdown",
        "customerSegments",
        "lowStockProducts",
        "__typename",
    }
)


@dataclass(frozen=True)
class Read:
    """One dashboard field's read: the query and arguments it asked for, the entry it got (encoded as stored)."""

    query: dashboard.DashboardQuery[Any]
    args: dict[str, Any]
    raw: bytes
    expires_at_ms: int


@dataclass
class Recorder:
    """Filled by the resolvers during one strawberry execution."""

    reads: list[Read] = field(default_factory=list)

    def record(self, query: dashboard.DashboardQuery[Any], args: dict[str, Any], entry: CacheEntry[Any]) -> None:
        ttl_s = get_settings().dashboard_cache_ttl_s
        self.reads.append(Read(query, dict(args), cache.encode(entry), entry.expires_at_ms(ttl_s)))


@dataclass
class MemoStats:
    hits: int = 0  # responses served from a memo
    stored: int = 0  # bodies memoized


stats = MemoStats()  # of this process (tests and benchmarks read it)


@dataclass
class Memo:
    reads: tuple[Read, ...]
    response: bytes
    checked: tuple[tuple[str, ...], float] = ((), float("-inf"))  # keys found unchanged in Redis, and when
    checking: tuple[tuple[str, ...], asyncio.Future[bool]] | None = None  # the look in Redis under way, if any

    @functools.cached_property
    def expires_at_ms(self) -> int:
        return min(read.expires_at_ms for read in self.reads)

    @functools.cached_property
    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The headers GraphQLMemo answers it with (the middlewares around it add theirs)."""
        return (b"content-type", b"application/json"), (b"content-length", str(len(self.response)).encode())


def is_dashboard_only(body: bytes) -> bool:
    """One query operation, no fragments, every top-level selection a dashboard field."""
    try:
        request = json.loads(body)
        document = parse(request["query"])
    except (ValueError, KeyError, TypeError, GraphQLError):
        return False
    if len(document.definitions) != 1:
        return False
    [operation] = document.definitions
    if not isinstance(operation, OperationDefinitionNode) or operation.operation != OperationType.QUERY:
        return False
    selections = operation.selection_set.selections
    return all(isinstance(s, FieldNode) and s.name.value in DASHBOARD_FIELDS for s in selections)


class GraphQLMemo:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, memos: dict[bytes, Memo] | None = None) -> None:
        self.app = app
        self.memos: dict[bytes, Memo] = {} if memos is None else memos  # shared with the app's MemoFront

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        try:
            body, more_body = await _read_ahead(receive, MAX_BODY)
        except HTTPException as exc:  # the body limit (api.limits), met while reading ahead of the route
            await error_response(exc.status_code, exc.detail)(scope, receive, send)
            return
        complete = not more_body and len(body) <= MAX_BODY  # larger bodies are never memoized
        memo = self.memos.get(body) if complete else None
        if memo is not None and await _still_valid(scope, memo):
            stats.hits += 1
            await _send_json(send, memo)
            return
        recorder = Recorder()
        scope[RECORDER] = recorder
        response = _Captured(send)
        await self.app(scope, _replay(body, receive, more_body), response.send)
        # reads first: only dashboard fields record any, and a trigger should not pay for decoding its answer
        if complete and recorder.reads and response.memoizable() and is_dashboard_only(body):
            if len(self.memos) >= MAX_ENTRIES:
                del self.memos[next(iter(self.memos))]
            self.memos[body] = Memo(tuple(recorder.reads), bytes(response.body))
            stats.stored += 1


class MemoFront:
    """ASGI, in front of the app's whole middleware stack: a memo hit that needs no waiting (the token verified
    in the process's cache, the memo confirmed in Redis recently enough: the cases `_still_valid` answers True
    without awaiting anything) is answered here, with the bytes and headers the stack gives it (GraphQLMemo's
    content type and length, SecurityHeaders' headers, DependencyGuard's fresh x-request-id), without the six
    middleware layers and their send closures it took there (about three quarters of a hit's CPU in the app).
    Anything else, including a hit that must wait for a token lookup or a look in Redis (whose failure is the
    guard's 503), goes on to the stack as it came, its body given back as read. Not installed when tracing is on
    (a hit keeps its server span) and never used for a request with an Origin header when CORS is configured
    (CORSMiddleware has headers to add)."""

    def __init__(self, app: ASGIApp, owner: Any, memos: dict[bytes, Memo], cors: bool) -> None:
        self.app = app
        self.owner = owner  # the Starlette app, whose state holds the token cache and the Redis pool
        self.memos = memos
        self.cors = cors

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH or not self.memos:
            await self.app(scope, receive, send)
            return
        declared = authorization = None
        origin = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == b"authorization":
                authorization = value
            elif key == b"origin":
                origin = True
        limit = min(MAX_BODY, get_settings().api_max_body_bytes)  # larger: BodyLimit's or strawberry's business
        if declared is None or not declared.isdigit() or int(declared) > limit or (origin and self.cors):
            await self.app(scope, receive, send)
            return
        body, more_body = await _read_ahead(receive, limit)
        memo = None if more_body else self.memos.get(body)
        if memo is not None and self._answerable(memo, authorization):
            stats.hits += 1
            await _send_json(send, memo, *EVERY_ANSWER, (b"x-request-id", new_request_id().encode()))
            return
        await self.app(scope, _replay(body, receive, more_body), send)

    def _answerable(self, memo: Memo, authorization: bytes | None) -> bool:
        try:
            state = self.owner.state
            principal = state.tokens.cached(None if authorization is None else authorization.decode("latin-1"))
            return principal is not None and principal.allows(Scope.READ) and _verdict(state.redis, memo) is True
        except Exception:  # the stack answers it, and whatever went wrong, as it would have
            return False


async def _still_valid(scope: AsgiScope, memo: Memo) -> bool:
    state = scope["app"].state
    try:
        require(await state.tokens.authenticate(state.db, _header(scope, b"authorization")), Scope.READ)
    except AuthError:
        return False  # strawberry answers it, with the error it deserves
    verdict = _verdict(state.redis, memo)
    return verdict if isinstance(verdict, bool) else await asyncio.shield(verdict)


def _verdict(redis: Redis, memo: Memo) -> bool | asyncio.Future[bool]:
    """Whether the memo may be answered now (the caller authenticated): True or False at once, or the look in
    Redis that decides it (started here when none is under way for these keys)."""
    if memo.expires_at_ms <= time.time() * 1000:
        return False
    checked_keys, checked_at = memo.checked
    if time.monotonic() - checked_at < REVALIDATE_S:
        return True  # the keys of this moment (a new local day is a new key) are derived again at the next look
    try:
        keys = tuple(dashboard.request(read.query, read.args).key for read in memo.reads)
    except dashboard.DashboardArgumentError:
        return False
    age = time.monotonic() - checked_at if keys == checked_keys else float("inf")
    # One look in Redis per memo at a time (at 100 clients, each request due sending its own MGET held up the event
    # loop for hundreds of ms); while it is under way, a memo confirmed less than STALE_S ago is still answered
    if memo.checking is None or memo.checking[0] != keys:
        look = asyncio.ensure_future(_unchanged(redis, memo, keys))
        look.add_done_callback(_retrieved)  # when no request waited for it, its failure is the next look's business
        memo.checking = (keys, look)
    if age < STALE_S:
        return True
    return memo.checking[1]


async def _unchanged(redis: Redis, memo: Memo, keys: tuple[str, ...]) -> bool:
    try:
        stored = await redis.mget(keys)
    except Exception:
        memo.checked = ((), float("-inf"))  # not answered again, stale window or not, until a look succeeds
        raise
    finally:
        if memo.checking is not None and memo.checking[0] == keys:
            memo.checking = None
    if all(raw == read.raw for raw, read in zip(stored, memo.reads, strict=True)):
        memo.checked = (keys, time.monotonic())
        return True
    memo.checked = ((), float("-inf"))  # found rewritten: answered no more, not even while the next look runs
    return False


def _retrieved(look: asyncio.Future[bool]) -> None:
    if not look.cancelled():
        look.exception()


def _header(scope: AsgiScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_ahead(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, read until its end or past `limit` bytes (or the client gone): what was read, and whether more
    is to come (then it was not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True  # gone: the app's next receive() says so again
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False) or size > limit:
            return b"".join(chunks), message.get("more_body", False)


def _replay(body: bytes, receive: Receive, more_body: bool = False) -> Receive:
    """`receive` with the body read ahead of it given first (the rest of it after, when more_body)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more_body}
        return await receive()  # the rest of the body; http.disconnect, when the client goes

    return replay


class _Captured:
    """Passes the response through and keeps a copy of it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.content_type = b""
        self.body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body" and len(self.body) <= MAX_BODY * 64:
            self.body += message.get("body", b"")
        await self._send(message)

    def memoizable(self) -> bool:
        if self.status != 200 or not self.content_type.startswith(b"application/json"):
            return False
        try:
            answer = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(answer, dict) and not answer.get("errors") and answer.get("data") is not None


async def _send_json(send: Send, memo: Memo, *headers: tuple[bytes, bytes]) -> None:
    """The memoized answer, with GraphQLMemo's headers and then `headers` (what MemoFront adds for the stack)."""
    await send({"type": "http.response.start", "status": 200, "headers": [*memo.headers, *headers]})
    await send({"type": "http.response.body", "body": memo.response})
