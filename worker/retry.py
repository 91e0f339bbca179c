"""Which faults are worth retrying, and how long to wait before the next try."""

from __future__ import annotations

import random
from typing import Literal

import asyncpg
import redis.exceptions

from worker.registry import RetryPolicy


class TransientError(Exception):
    """Raise from a job for a fault that another try may not hit (e.g. an upstream 503)."""


_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57P0")  # connection, rollback/deadlock, resources, shutdown
_TRANSIENT_SQLSTATES = {"55P03"}  # lock_not_available: lock_timeout hit

TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,  # builtin: refused/reset sockets
    TimeoutError,  # a client-side timeout inside the job (the job's own time limit is handled before this)
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    asyncpg.exceptions.InterfaceError,  # e.g. connection closed mid-query
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.LockNotAvailableError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    return False


def backoff_seconds(policy: RetryPolicy, failed_tries: int, rng: random.Random | None = None) -> float:
    """Exponential backoff, capped, with equal jitter: half fixed, half random (avoids retry stampedes)."""
    ceiling: float = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** max(failed_tries - 1, 0))
    jitter: float = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


# ---- dependency outages: waited out, not counted as tries ---------------------------------------------------------
Dependency = Literal["postgresql", "redis"]
DEPENDENCY_NAMES: dict[Dependency, str] = {"postgresql": "PostgreSQL", "redis": "Redis"}

# PostgreSQL is unreachable, restarting or full: the server's state, not the job's fault
_PG_DOWN: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08, and a connection that died under a query
    asyncpg.exceptions.CannotConnectNowError,  # 57P03 starting up / shutting down; 57P01/57P02 terminated
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
)
_PG_CLOSED = ("connection is closed", "connection was closed", "pool is closed")
# Redis is unreachable or still loading its data; wrong credentials are a configuration fault, not an outage
_REDIS_DOWN: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_REDIS_MISCONFIGURED: tuple[type[BaseException], ...] = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
)
_SOCKET_FAULTS: tuple[type[BaseException], ...] = (OSError, TimeoutError)  # ConnectionError is an OSError


def dependency_down(exc: BaseException) -> Dependency | None:
    """Which of the platform's own servers a job's exception says is unreachable, or None when the fault is the
    job's (its input, its code, a third party it calls). Looks through `raise ... from` and implicit chains. A bare
    socket error (refused, reset, timed out) counts only when it was raised inside asyncpg's or redis-py's code, so
    a webhook or an SMTP server that is down stays the job's own transient fault, spending tries."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _classify(current)
        if found:
            return found
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException) -> Dependency | None:
    if isinstance(exc, _REDIS_DOWN):
        return None if isinstance(exc, _REDIS_MISCONFIGURED) else "redis"
    if isinstance(exc, _PG_DOWN):
        return "postgresql"
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and any(t in str(exc) for t in _PG_CLOSED):
        return "postgresql"
    if isinstance(exc, _SOCKET_FAULTS):
        return _raised_inside(exc)
    return None


def _raised_inside(exc: BaseException) -> Dependency | None:
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module == "asyncpg" or module.startswith("asyncpg."):
            return "postgresql"
        if module == "redis" or module.startswith("redis."):
            return "redis"
        tb = tb.tb_next
    return None


def dependency_backoff_s(waits: int, cap_s: float, rng: random.Random | None = None) -> float:
    """How long a job waits before trying an unreachable dependency again: 1 s doubling per wait, capped, with
    equal jitter, so jobs that met the same outage come back spread out rather than all at once."""
    ceiling = min(cap_s, 2.0 ** max(waits - 1, 0))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
