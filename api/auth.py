"""Bearer-token authentication: who the caller is (docs/rest.md#auth). What a principal may do is decided in
salesdash.auth and checked by the job service (worker.client), the same for REST, GraphQL and the CLI."""

from __future__ import annotations

import asyncpg

from db.queries.tokens import scopes_for
from salesdash.auth import Principal, UnauthenticatedError


async def authenticate(db: asyncpg.Pool, authorization: str | None) -> Principal:
    """The principal of an `Authorization: Bearer <token>` header; UnauthenticatedError (401) when missing,
    malformed, unknown or revoked."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise UnauthenticatedError("missing bearer token (Authorization: Bearer <token>)")
    scopes = await scopes_for(db, authorization[7:].strip())
    if scopes is None:
        raise UnauthenticatedError("invalid or revoked token")
    return Principal.of(scopes)
