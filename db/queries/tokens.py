"""API tokens: only a SHA-256 of each token is stored; the token itself is shown once at creation."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

SCOPES = ("read", "trigger", "admin")


@dataclass(frozen=True, slots=True)
class ActiveToken:
    """A token that is neither revoked nor expired when it was read; `expires_at` None: it never expires."""

    id: int
    scopes: tuple[str, ...]
    expires_at: datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, scope: str, expires_in: timedelta | None = None
) -> tuple[int, str]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    if not name.strip():
        raise ValueError("token name must not be empty")
    if expires_in is not None and expires_in <= timedelta(0):
        raise ValueError("expires_in must be positive")
    token = "sd_" + secrets.token_urlsafe(32)
    token_id = await conn.fetchval(
        "INSERT INTO api_tokens (name, token_hash, scopes, expires_at) VALUES ($1, $2, $3, now() + $4) RETURNING id",
        name,
        hash_token(token),
        [scope],
        expires_in,
    )
    return int(token_id), token


_ACTIVE = """
SELECT id, scopes, expires_at FROM api_tokens
 WHERE token_hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"""


async def active_token(conn: asyncpg.Connection | asyncpg.Pool, token_hash: str) -> ActiveToken | None:
    """The token with this hash, or None when it is unknown, revoked or expired. Read only: the API records
    use in batches (`record_last_used`), so a request never waits on a write."""
    row = await conn.fetchrow(_ACTIVE, token_hash)
    return ActiveToken(int(row["id"]), tuple(row["scopes"]), row["expires_at"]) if row else None


async def record_last_used(conn: asyncpg.Connection | asyncpg.Pool, used: Mapping[int, datetime]) -> None:
    """One statement for a batch of token id → when it was last used; never moves `last_used_at` back."""
    if not used:
        return
    await conn.execute(
        """UPDATE api_tokens a SET last_used_at = u.at
             FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at)
            WHERE a.id = u.id AND (a.last_used_at IS NULL OR a.last_used_at < u.at)""",
        list(used),
        list(used.values()),
    )


async def list_tokens(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, name, scopes, created_at, last_used_at, expires_at, revoked_at,"
        " (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())) AS active FROM api_tokens ORDER BY id"
    )
    return [dict(r) for r in rows]


async def revoke_token(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> bool:
    status = await conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id
    )
    return str(status).endswith(" 1")


async def revoke_tokens_named(conn: asyncpg.Connection | asyncpg.Pool, prefix: str) -> int:
    """Revoke every active token whose name starts with `prefix` (`salesdash up` ending its earlier runs' tokens)."""
    status = await conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE starts_with(name, $1) AND revoked_at IS NULL", prefix
    )
    return int(str(status).rsplit(" ", 1)[-1])
