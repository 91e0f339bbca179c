"""FastAPI dependencies: the process's pools (opened in the lifespan) and the caller's principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from api.auth import TokenVerifier
from salesdash.auth import Principal, Scope, require


# `async def`, though they await nothing: FastAPI runs a plain `def` dependency in its thread pool, a thread
# hand-off per dependency per request (a third of a trigger's cost in bench/api.py)
async def get_db(request: Request) -> asyncpg.Pool:
    return request.app.state.db


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


async def get_tokens(request: Request) -> TokenVerifier:
    return request.app.state.tokens  # type: ignore[no-any-return]


DbDep = Annotated[asyncpg.Pool, Depends(get_db)]
RedisDep = Annotated[Redis, Depends(get_redis)]
TokensDep = Annotated[TokenVerifier, Depends(get_tokens)]


# Declares the bearer scheme in the OpenAPI document; the header itself is read as it came (a malformed one is a 401
# with our message, not FastAPI's 403).
_bearer = HTTPBearer(auto_error=False, description="a token from `salesdash token create` (docs/rest.md#auth)")


async def principal(
    request: Request, db: DbDep, tokens: TokensDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    return await tokens.authenticate(db, request.headers.get("authorization"))


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
