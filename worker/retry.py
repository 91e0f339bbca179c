"""Which faults are worth retrying, and how long to wait before the next try."""

from __future__ import annotations

import random

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
