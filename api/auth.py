"""Bearer-token authentication: who the caller is (docs/rest.md#auth). What a principal may do is decided in
salesdash.auth and checked by the job service (worker.client), the same for REST, GraphQL and the CLI.

Verified tokens are cached in the process for `token_cache_s`, so a request costs no PostgreSQL round trip and
routes that need only Redis keep answering while PostgreSQL is down; a revoked or deleted token stops working
within that time, an expired one at once (its expiry is cached with it). `last_used_at` is gathered in memory and
written in one batch per interval by `flush_last_used`, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from db.queries.tokens import ActiveToken, active_token, hash_token, record_last_used
from salesdash.auth import Principal, UnauthenticatedError
from salesdash.config import Settings

log = logging.getLogger(__name__)

# what asyncpg raises when PostgreSQL cannot be reached (refused, reset, gone away, starting up)
DB_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
_MAX_ENTRIES = 10_000  # unknown tokens are cached too; a flood of random ones only evicts, never grows memory


@dataclass(frozen=True, slots=True)
class _Entry:
    token: ActiveToken | None  # None: unknown, revoked or expired when checked
    checked_at: float  # time.monotonic()
    principal: Principal | None = None  # the token's, made once per check rather than per request


def bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise UnauthenticatedError("missing bearer token (Authorization: Bearer <token>)")
    return authorization[7:].strip()


class TokenVerifier:
    """One per API process: the token cache and the pending `last_used_at` writes."""

    def __init__(self, cache_s: float, stale_s: float = 0) -> None:
        self.cache_s = cache_s
        self.stale_s = stale_s
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[ActiveToken | None]] = {}
        self._used: dict[int, datetime] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(settings.token_cache_s, settings.token_stale_s)

    async def authenticate(self, db: asyncpg.Pool, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <token>` header; UnauthenticatedError (401) when missing,
        malformed, unknown, expired or revoked."""
        return await self.by_hash(db, hash_token(bearer_token(authorization)))

    async def by_hash(self, db: asyncpg.Pool, token_hash: str) -> Principal:
        """The principal of a stored token hash (a dashboard session keeps the hash, never the token)."""
        return self._admit(await self._entry(db, token_hash))

    def cached(self, authorization: str | None) -> Principal | None:
        """`authenticate` answered from the cache alone, without waiting: the principal of a token checked less
        than `token_cache_s` ago and still valid (its use recorded), else None, whatever the reason (no entry, an
        old one, a refused token): `authenticate` then decides, and gives the refusal its error. For a path that
        must not wait (api.graphql_memo's answers in front of the app)."""
        try:
            token_hash = hash_token(bearer_token(authorization))
        except UnauthenticatedError:
            return None
        entry = self._cache.get(token_hash)
        if entry is None or not self._fresh(entry, time.monotonic()):
            return None
        try:
            return self._admit(entry)
        except UnauthenticatedError:
            return None

    def _fresh(self, entry: _Entry, now: float) -> bool:
        """Checked less than `token_cache_s` ago (`now` from time.monotonic())."""
        return now - entry.checked_at < self.cache_s

    def _admit(self, entry: _Entry) -> Principal:
        token, principal = entry.token, entry.principal
        now = datetime.now(UTC)
        if token is None or principal is None:
            raise UnauthenticatedError("invalid, expired or revoked token")
        if token.expires_at is not None and token.expires_at <= now:
            raise UnauthenticatedError("token expired")
        self._used[token.id] = now
        return principal

    async def _entry(self, db: asyncpg.Pool, token_hash: str) -> _Entry:
        now = time.monotonic()
        cached = self._cache.get(token_hash)
        if cached is not None and self._fresh(cached, now):
            return cached
        try:
            token = await self._lookup(db, token_hash)
        except DB_UNREACHABLE:
            # a token verified shortly before keeps working through a PostgreSQL outage (docs/configuration.md)
            trusted = cached is not None and cached.token is not None
            if cached is not None and trusted and now - cached.checked_at < self.cache_s + self.stale_s:
                return cached
            raise
        entry = _Entry(token, time.monotonic(), Principal.of(token.scopes, token.id) if token else None)
        self._cache.pop(token_hash, None)
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))  # the oldest checked
        self._cache[token_hash] = entry
        return entry

    async def _lookup(self, db: asyncpg.Pool, token_hash: str) -> ActiveToken | None:
        """One PostgreSQL query per token however many requests wait on it at once."""
        pending = self._inflight.get(token_hash)
        if pending is None:
            pending = self._inflight[token_hash] = asyncio.ensure_future(active_token(db, token_hash))
            pending.add_done_callback(lambda _: self._inflight.pop(token_hash, None))
        return await asyncio.shield(pending)

    async def flush_last_used(self, db: asyncpg.Pool) -> int:
        """Write the pending `last_used_at`s in one statement; kept for the next flush if PostgreSQL is down."""
        used, self._used = self._used, {}
        try:
            await record_last_used(db, used)
        except BaseException:
            for token_id, at in used.items():
                self._used[token_id] = max(at, self._used.get(token_id, at))
            raise
        return len(used)

    @contextlib.asynccontextmanager
    async def flushing(self, db: asyncpg.Pool, interval_s: float) -> AsyncIterator[None]:
        """Flush `last_used_at` every interval while the app runs, and once more at shutdown."""
        task = asyncio.create_task(self._flush_forever(db, interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.flush_last_used(db)

    async def _flush_forever(self, db: asyncpg.Pool, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush_last_used(db)
            except Exception as exc:  # PostgreSQL down: the uses stay pending for the next round
                log.warning("could not record token use: %s", exc)
