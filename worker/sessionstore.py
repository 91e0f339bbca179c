"""Dashboard sign-in sessions in Redis, beside worker/jobstore.py (which owns the rest of the wire format):
`salesdash:session:<sha256 of the session id>` → the SHA-256 of the API token signed in with, expiring with the
session. Neither the session id nor the token is stored, so reading Redis signs nobody in."""

from __future__ import annotations

import hashlib
import secrets

from redis.asyncio import Redis

from worker.jobstore import PREFIX


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{hashlib.sha256(session_id.encode()).hexdigest()}"


async def create_session(redis: Redis, token_hash: str, ttl_s: int) -> str:
    """A new session for the token with this hash; returns its id (the cookie's value)."""
    session_id = secrets.token_urlsafe(32)
    await redis.set(session_key(session_id), token_hash, ex=ttl_s)
    return session_id


async def session_token_hash(redis: Redis, session_id: str) -> str | None:
    """The token hash of a live session; None when it expired, was ended, or never existed."""
    raw = await redis.get(session_key(session_id))
    return raw.decode() if isinstance(raw, bytes) else raw


async def end_session(redis: Redis, session_id: str) -> None:
    await redis.delete(session_key(session_id))
