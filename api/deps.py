"""FastAPI dependencies: the process's pools (opened in the lifespan) and the caller's principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import asyncpg
from fastapi import Depends, Header, Request
from redis.asyncio import Redis

from api.auth import TokenVerifier
from salesdash.auth import Principal, Scope, require


def get_db(request: Request) -> asyncpg.Pool:
    return request.app.state.db


def get_redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


def get_tokens(request: Request) -> TokenVerifier:
    return request.app.state.tokens  # type: ignore[no-any-return]


DbDep = Annotated[asyncpg.Pool, Depends(get_db)]
RedisDep = Annotated[Redis, Depends(get_redis)]
TokensDep = Annotated[TokenVerifier, Depends(get_tokens)]


async def principal(db: DbDep, tokens: TokensDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    return await tokens.authenticate(db, authorization)


def scoped(needed: Scope) -> Callable[..., Awaitable[Principal]]:
    """For read-only routes, whose service functions take no principal: the same rule, checked at the door."""

    async def dependency(caller: Annotated[Principal, Depends(principal)]) -> Principal:
        require(caller, needed)
        return caller

    return dependency


# Routes that change jobs take only an authenticated principal: the job service checks the scope each operation
# and each task needs (a trigger token may abort an ordinary task's job but not an admin task's).
PrincipalDep = Annotated[Principal, Depends(principal)]
ReadDep = Annotated[Principal, Depends(scoped(Scope.READ))]
