"""A private PostgreSQL database for tests whose job changes the whole database (every customer's segment, the
set of order partitions): created on the suite's server, migrated, and dropped afterwards, so the suite's shared
database and other tests never see it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2

from db.migrate import upgrade
from salesdash.config import Settings, get_settings


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _admin(statement: str) -> None:
    admin = psycopg2.connect(_with_database(os.environ["DATABASE_URL"], "postgres"))
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(statement)
    finally:
        admin.close()


@contextmanager
def private_database(prefix: str) -> Iterator[str]:
    """The URL of a fresh, migrated database named `<prefix>_<random>`; dropped (connections and all) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(os.environ["DATABASE_URL"], name)
        upgrade(url)
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(url: str, **overrides: object) -> Settings:
    """The suite's settings pointed at `url`, with `overrides` (field names, e.g. timezone="Pacific/Auckland")."""
    return get_settings().model_copy(update={"database_url": url, **overrides})
