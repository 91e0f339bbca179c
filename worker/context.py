"""What every queue's Settings shares: the job context (one asyncpg pool per worker process), JSON job
serialization, and the values read from the environment."""

from __future__ import annotations

import json
from typing import Any

from salesdash.config import get_settings
from salesdash.connections import open_db_pool
from salesdash.logs import setup_logging


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    ctx["settings"] = settings
    ctx["db"] = await open_db_pool(settings)


async def shutdown(ctx: dict[str, Any]) -> None:
    pool = ctx.pop("db", None)
    if pool is not None:
        await pool.close()


def serialize_json(value: dict[str, Any]) -> bytes:
    """arq's serializer hook: JSON, never pickle, so writing to Redis can't run code in a worker."""
    return json.dumps(value, default=str).encode()


def deserialize_json(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("job payload is not a JSON object")
    return value
