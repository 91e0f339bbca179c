"""Turning the configured URLs into connections: one asyncpg pool and one arq Redis pool per process."""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
from arq.connections import ArqRedis, RedisSettings, create_pool

from salesdash.config import Settings, get_settings
from salesdash.embedded import resolve_urls


def database_url(settings: Settings | None = None) -> str:
    return resolve_urls(settings or get_settings())[0]


def redis_settings(settings: Settings | None = None) -> RedisSettings:
    """RedisSettings from REDIS_URL; `redis+sentinel://h1:p1,h2:p2/service_name[/db]` selects Sentinel."""
    url = resolve_urls(settings or get_settings())[1]
    if not url.startswith("redis+sentinel://"):
        return RedisSettings.from_dsn(url)
    parts = urlsplit(url)
    hosts = []
    for host_port in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = host_port.partition(":")
        hosts.append((host, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("REDIS_URL: redis+sentinel:// needs the service name as its path")
    return RedisSettings(
        host=hosts,  # arq accepts a host list for sentinel
        sentinel=True,
        sentinel_master=path[0],
        database=int(path[1]) if len(path) > 1 else 0,
        password=unquote(parts.password) if parts.password else None,
    )


class LazyRedisSettings(RedisSettings):
    """`redis_settings()` resolved when a field is first read: a queue's `Settings` can hold one without
    importing it starting an embedded server; launching the worker (or `arq --check`) reads it and starts one."""

    def __init__(self) -> None:  # the fields are filled on first read
        pass

    def __getattribute__(self, name: str) -> Any:
        own = object.__getattribute__(self, "__dict__")
        if name in _REDIS_FIELDS and name not in own:  # class-level defaults would otherwise answer
            own.update(vars(redis_settings()))
        return object.__getattribute__(self, name)


_REDIS_FIELDS = frozenset(f.name for f in dataclasses.fields(RedisSettings))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python values, so queries never hand-serialise JSON
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def open_db_pool(
    settings: Settings | None = None, max_size: int | None = None, *, connect_now: bool = True
) -> asyncpg.Pool:
    """`connect_now=False`: open no connection yet (the first query connects), for a process that must start while
    PostgreSQL is down."""
    settings = settings or get_settings()
    pool = await asyncpg.create_pool(
        database_url(settings),
        min_size=1 if connect_now else 0,
        max_size=max_size or settings.db_pool_max,
        init=_init_connection,
        command_timeout=None,
    )
    assert pool is not None
    return pool


async def open_redis(settings: Settings | None = None) -> ArqRedis:
    return await create_pool(redis_settings(settings))
