"""Who a browser is: dashboard sign-in sessions (docs/rest.md#dashboard-sessions).

Signing in with a token creates a server-side session in Redis (worker.sessionstore); the browser holds only the
session id, in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS) that expires with the session. Each request
re-checks the token behind the session through the token cache, so revoking or expiring the token ends its
sessions too (revocation within the cache time). Scripts keep sending `Authorization: Bearer`, which wins.
"""

from __future__ import annotations

import asyncpg
from fastapi import Request, Response
from redis.asyncio import Redis

from api.auth import TokenVerifier, bearer_token
from db.queries.tokens import hash_token
from salesdash.auth import Principal, Scope, UnauthenticatedError, require
from salesdash.config import get_settings
from worker import sessionstore

COOKIE = "salesdash_session"


async def sign_in(request: Request, response: Response, token: str) -> None:
    """Verify a token (read scope at least) and start a session for it; AuthError when refused."""
    state = request.app.state
    token_hash = hash_token(bearer_token(f"Bearer {token}"))
    require(await _verifier(request).by_hash(state.db, token_hash), Scope.READ)
    ttl_s = get_settings().session_ttl_s
    session_id = await sessionstore.create_session(state.redis, token_hash, ttl_s)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=ttl_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def sign_out(request: Request, response: Response) -> None:
    session_id = request.cookies.get(COOKIE)
    if session_id:
        await sessionstore.end_session(request.app.state.redis, session_id)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")


async def request_principal(request: Request) -> Principal:
    """The caller of a browser-facing route: the bearer header when sent, else the session cookie; UnauthenticatedError
    (401) when neither is valid."""
    state = request.app.state
    authorization = request.headers.get("authorization")
    session_id = request.cookies.get(COOKIE)
    if authorization or not session_id:
        return await _verifier(request).authenticate(state.db, authorization)
    return await session_principal(state.redis, state.db, _verifier(request), session_id)


async def session_principal(redis: Redis, db: asyncpg.Pool, tokens: TokenVerifier, session_id: str) -> Principal:
    token_hash = await sessionstore.session_token_hash(redis, session_id)
    if token_hash is None:
        raise UnauthenticatedError("session expired or signed out; sign in again")
    return await tokens.by_hash(db, token_hash)


def _verifier(request: Request) -> TokenVerifier:
    return request.app.state.tokens  # type: ignore[no-any-return]
