"""Configuration (docs/configuration.md): URL forms and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from salesdash.config import Settings
from salesdash.connections import database_url, redis_settings


def _settings(**env: str) -> Settings:
    values: dict[str, Any] = {"DATABASE_URL": "postgresql://u@db:5432/x", "REDIS_URL": "redis://r:6379/0", **env}
    return Settings(**values)


def test_sqlalchemy_style_database_url_is_accepted() -> None:
    settings = _settings(DATABASE_URL="postgresql+asyncpg://app:secret@db.internal:6543/sales")
    assert database_url(settings) == "postgresql://app:secret@db.internal:6543/sales"


def test_redis_url_forms() -> None:
    plain = redis_settings(_settings(REDIS_URL="redis://:pw@cache:6380/3"))
    assert (plain.host, plain.port, plain.database, plain.password, plain.ssl) == ("cache", 6380, 3, "pw", False)
    assert redis_settings(_settings(REDIS_URL="rediss://cache:6390/0")).ssl is True
    sentinel = redis_settings(_settings(REDIS_URL="redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2"))
    assert sentinel.sentinel and sentinel.sentinel_master == "mymaster"
    assert sentinel.host == [("s1", 26379), ("s2", 26380)] and sentinel.database == 2 and sentinel.password == "pw"
    with pytest.raises(ValueError, match="service name"):
        redis_settings(_settings(REDIS_URL="redis+sentinel://s1:26379"))


def test_unknown_timezone_is_named() -> None:
    with pytest.raises(ValidationError, match="Mars/Olympus"):
        _settings(SALESDASH_TIMEZONE="Mars/Olympus")
    assert str(_settings(SALESDASH_TIMEZONE="Europe/Berlin").tzinfo) == "Europe/Berlin"


def test_rollup_lock_timeout_must_be_positive() -> None:
    assert _settings(SALESDASH_ROLLUP_LOCK_TIMEOUT="2.5").rollup_lock_timeout == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValidationError, match="SALESDASH_ROLLUP_LOCK_TIMEOUT"):
            _settings(SALESDASH_ROLLUP_LOCK_TIMEOUT=bad)
