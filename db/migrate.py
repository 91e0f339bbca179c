"""Apply the Alembic migrations (safe to run any number of times)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_INI = Path(__file__).with_name("alembic.ini")


def sqlalchemy_url(database_url: str | None = None) -> str:
    if database_url is None:
        from salesdash.embedded import resolve_urls

        database_url = resolve_urls()[0]
    url = database_url
    return "postgresql+asyncpg://" + url.split("://", 1)[1]


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    config = Config(str(_INI))
    config.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(config, revision)
