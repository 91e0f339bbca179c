"""One settings object for every process (docs/configuration.md), read from the environment and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    data_dir: Path = Field(default=Path(".salesdash"), validation_alias="SALESDASH_DATA_DIR")
    timezone: str = Field(default="UTC", validation_alias="SALESDASH_TIMEZONE")
    log_json: bool = Field(default=False, validation_alias="SALESDASH_LOG_JSON")
    log_level: str = Field(default="INFO", validation_alias="SALESDASH_LOG_LEVEL")
    db_pool_max: int = Field(default=10, validation_alias="SALESDASH_DB_POOL_MAX")
    job_history_days: int = Field(default=30, validation_alias="SALESDASH_JOB_HISTORY_DAYS")
    shutdown_timeout: int = Field(default=30, validation_alias="SALESDASH_SHUTDOWN_TIMEOUT")
    export_max_days: int = Field(default=366, ge=1, validation_alias="SALESDASH_EXPORT_MAX_DAYS")
    export_retention_days: int = Field(default=7, ge=1, validation_alias="SALESDASH_EXPORT_RETENTION_DAYS")
    # pause after each chunk an export writes: 0 in production; tests use it to kill a worker mid-export
    export_pause_ms: int = Field(default=0, ge=0, validation_alias="SALESDASH_EXPORT_PAUSE_MS")
    alert_recipient: str = Field(default="ops@example.com", validation_alias="SALESDASH_ALERT_RECIPIENT")
    # update_customer_segments scores the orders of the last this many days
    rfm_window_days: int = Field(default=365, ge=1, le=36500, validation_alias="SALESDASH_RFM_WINDOW_DAYS")
    # clean_old_order_partitions drops the monthly partitions wholly older than this many months (local months)
    order_retention_months: int = Field(default=24, ge=3, le=1200, validation_alias="SALESDASH_ORDER_RETENTION_MONTHS")
    # how long one DETACH/DROP of a partition waits for a lock before it gives up and tries again
    partition_lock_timeout: float = Field(default=5.0, gt=0, validation_alias="SALESDASH_PARTITION_LOCK_TIMEOUT")
    # prune_old_records: rows older than these go, in bounded batches
    report_retention_days: int = Field(default=1095, ge=1, validation_alias="SALESDASH_REPORT_RETENTION_DAYS")
    notification_retention_days: int = Field(default=90, ge=1, validation_alias="SALESDASH_NOTIFICATION_RETENTION_DAYS")
    segment_history_retention_days: int = Field(
        default=730, ge=1, validation_alias="SALESDASH_SEGMENT_HISTORY_RETENTION_DAYS"
    )
    # how long a rollup refresh waits for a lock (a rebuild for running refreshes, any refresh for table locks)
    rollup_lock_timeout: float = Field(default=5.0, gt=0, validation_alias="SALESDASH_ROLLUP_LOCK_TIMEOUT")
    api_host: str = Field(default="127.0.0.1", validation_alias="SALESDASH_API_HOST")
    api_port: int = Field(default=8000, validation_alias="SALESDASH_API_PORT")
    # warm_dashboard_cache runs every 2 min: a TTL several times that rides out a failed or slow run
    dashboard_cache_ttl_s: float = Field(default=600, ge=120, validation_alias="SALESDASH_DASHBOARD_CACHE_TTL")
    dashboard_cache_lock_s: float = Field(default=30, gt=0, validation_alias="SALESDASH_DASHBOARD_CACHE_LOCK_TIMEOUT")

    # a lifetime-value fit that needs more optimiser iterations than this has not converged: yesterday's model stays
    ltv_fit_max_iterations: int = Field(default=500, ge=1, validation_alias="SALESDASH_LTV_FIT_MAX_ITERATIONS")
    # check_system_health's thresholds: a check fails past them
    health_long_query_s: float = Field(default=300, gt=0, validation_alias="SALESDASH_HEALTH_LONG_QUERY_SECONDS")
    health_connections_max_ratio: float = Field(
        default=0.8, gt=0, le=1, validation_alias="SALESDASH_HEALTH_CONNECTIONS_MAX_RATIO"
    )
    health_realtime_rollup_max_age_s: float = Field(
        default=900, gt=0, validation_alias="SALESDASH_HEALTH_REALTIME_ROLLUP_MAX_AGE_SECONDS"
    )
    health_daily_rollup_max_age_s: float = Field(
        default=7200, gt=0, validation_alias="SALESDASH_HEALTH_DAILY_ROLLUP_MAX_AGE_SECONDS"
    )
    health_redis_memory_max_ratio: float = Field(
        default=0.9, gt=0, le=1, validation_alias="SALESDASH_HEALTH_REDIS_MEMORY_MAX_RATIO"
    )
    health_queue_wait_max_s: float = Field(default=300, gt=0, validation_alias="SALESDASH_HEALTH_QUEUE_WAIT_SECONDS")

    # API tokens and sessions (issue 10, docs/configuration.md#api-security)
    # a verified token is trusted this long without asking PostgreSQL again: revocation takes effect within it
    token_cache_s: float = Field(default=30, gt=0, le=3600, validation_alias="SALESDASH_TOKEN_CACHE_SECONDS")
    # while PostgreSQL is unreachable a token verified before keeps working this much longer (0: not at all)
    token_stale_s: float = Field(default=300, ge=0, validation_alias="SALESDASH_TOKEN_STALE_IF_DB_DOWN_SECONDS")
    # `last_used_at` is written in one batch per interval, per API process, off the request path
    token_last_used_interval_s: float = Field(
        default=60, gt=0, validation_alias="SALESDASH_TOKEN_LAST_USED_INTERVAL_SECONDS"
    )
    # triggers (POST /jobs, triggerBackgroundTask, retries) per token: a GCRA bucket in Redis; rate 0 turns it off
    trigger_rate_per_minute: float = Field(default=60, ge=0, validation_alias="SALESDASH_TRIGGER_RATE_PER_MINUTE")
    trigger_burst: int = Field(default=20, ge=1, validation_alias="SALESDASH_TRIGGER_BURST")
    idempotency_window_s: int = Field(default=86400, ge=1, validation_alias="SALESDASH_IDEMPOTENCY_WINDOW_SECONDS")
    session_ttl_s: int = Field(default=8 * 3600, ge=60, validation_alias="SALESDASH_SESSION_TTL_SECONDS")
    graphiql: bool = Field(default=True, validation_alias="SALESDASH_GRAPHIQL")
    graphql_introspection: bool = Field(default=True, validation_alias="SALESDASH_GRAPHQL_INTROSPECTION")
    # comma-separated origins allowed by CORS; empty: no CORS headers at all
    cors_origins: str = Field(default="", validation_alias="SALESDASH_CORS_ORIGINS")
    api_workers: int = Field(default=1, ge=1, le=64, validation_alias="SALESDASH_API_WORKERS")

    @field_validator("database_url")
    @classmethod
    def _plain_postgres_scheme(cls, value: str | None) -> str | None:
        # asyncpg wants postgresql://; SQLAlchemy users often write postgresql+asyncpg://
        if value and value.startswith("postgresql+asyncpg://"):
            return "postgresql://" + value.removeprefix("postgresql+asyncpg://")
        return value or None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (KeyError, ValueError):
            raise ValueError(f"SALESDASH_TIMEZONE: unknown timezone {value!r} (use an IANA name such as UTC)") from None
        return value

    @property
    def tzinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def exports_dir(self) -> Path:
        """Where `export_analytics_data` writes its files and `GET /exports/{task_id}` reads them."""
        return self.data_dir / "exports"


@lru_cache
def get_settings() -> Settings:
    return Settings()
