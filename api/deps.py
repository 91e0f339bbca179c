"""FastAPI dependencies: the process's pools (opened in the lifespan) and scope checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import asyncpg
from fastapi import Depends, Header, Request
from redis.asyncio import Redis

from api.auth import Principal, authenticate, require
from worker.registry import Scope


def get_db(request: Request) -> asyncpg.Pool:
    return request.app.state.db  # type: ignore[no-any-return]


def get_redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


DbDep = Annotated[asyncpg.Pool, Depends(get_db)]
RedisDep = Annotated[Redis, Depends(get_redis)]


def scoped(needed: Scope) -> Callable[..., Awaitable[Principal]]:
    async def dependency(db: DbDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
        principal = await authenticate(db, authorization)
        require(principal, needed)
        return principal

    return dependency


ReadDep = Annotated[Principal, Depends(scoped(Scope.READ))]
TriggerDep = Annotated[Principal, Depends(scoped(Scope.TRIGGER))]
