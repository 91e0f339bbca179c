"""API tokens: only a SHA-256 of each token is stored; the token itself is shown once at creation."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import asyncpg

SCOPES = ("read", "trigger", "admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(conn: asyncpg.Connection | asyncpg.Pool, name: str, scope: str) -> tuple[int, str]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    if not name.strip():
        raise ValueError("token name must not be empty")
    token = "sd_" + secrets.token_urlsafe(32)
    token_id = await conn.fetchval(
        "INSERT INTO api_tokens (name, token_hash, scopes) VALUES ($1, $2, $3) RETURNING id",
        name,
        hash_token(token),
        [scope],
    )
    return int(token_id), token


# `last_used_at` is written at most once a minute per token: a write on every request would make concurrent
# requests with one token queue on its row lock, each behind the previous one's commit.
_SCOPES_FOR = """
WITH token AS (SELECT id, scopes, last_used_at FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL),
used AS (UPDATE api_tokens a SET last_used_at = now() FROM token t
          WHERE a.id = t.id AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute'))
SELECT scopes FROM token"""


async def scopes_for(conn: asyncpg.Connection | asyncpg.Pool, token: str) -> list[str] | None:
    """The token's scopes, or None when it is unknown or revoked; records when it was last used (to the minute)."""
    row = await conn.fetchrow(_SCOPES_FOR, hash_token(token))
    return list(row["scopes"]) if row else None


async def list_tokens(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT id, name, scopes, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY id")
    return [dict(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> bool:
    status = await conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id
    )
    return str(status).endswith(" 1")
