"""One settings object for every process (docs/configuration.md), read from the environment and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, field_validator
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
    # > 0: an enqueue waits up to this long for one Redis replica to acknowledge it (WAIT 1 <ms>) and reports
    # when none did; 0: no wait (asynchronous replication: a failover can lose the last moments' enqueues)
    enqueue_replica_wait_ms: int = Field(
        default=0, ge=0, le=60_000, validation_alias="SALESDASH_ENQUEUE_REPLICA_WAIT_MS"
    )
    # a running job's lease: its worker renews it every second; once it runs out (worker dead, paused, cut off) any
    # worker re-queues the job, and the old try's writes are refused (fencing). Small values only for tests.
    lease_s: float = Field(default=30, ge=2, validation_alias="SALESDASH_LEASE_SECONDS")
    # a job that cannot reach PostgreSQL or Redis waits for it this long, without spending a try, before the fault
    # counts as one of its tries; between waits it backs off from 1 s doubling up to the cap
    dependency_wait_s: float = Field(default=600, ge=0, validation_alias="SALESDASH_DEPENDENCY_WAIT_SECONDS")
    dependency_backoff_cap_s: float = Field(
        default=30, ge=1, validation_alias="SALESDASH_DEPENDENCY_BACKOFF_CAP_SECONDS"
    )
    # API cost limits (docs/configuration.md#api-limits): checked before a request is parsed or executed
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024, validation_alias="SALESDASH_API_MAX_BODY_BYTES")
    graphql_max_query_bytes: int = Field(default=16_384, ge=256, validation_alias="SALESDASH_GRAPHQL_MAX_QUERY_BYTES")
    graphql_max_tokens: int = Field(default=2000, ge=50, validation_alias="SALESDASH_GRAPHQL_MAX_TOKENS")
    graphql_max_aliases: int = Field(default=20, ge=1, validation_alias="SALESDASH_GRAPHQL_MAX_ALIASES")
    graphql_max_depth: int = Field(default=8, ge=2, validation_alias="SALESDASH_GRAPHQL_MAX_DEPTH")
    graphql_max_fields: int = Field(default=200, ge=10, validation_alias="SALESDASH_GRAPHQL_MAX_FIELDS")
    # what a 503 tells the client to wait when PostgreSQL or Redis is unreachable
    api_retry_after_s: int = Field(default=5, ge=1, validation_alias="SALESDASH_API_RETRY_AFTER_SECONDS")
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
    # notifications (docs/configuration.md#notifications). Channel values are parsed by worker/channels.py, which
    # names a malformed one without stopping the others; secrets are SecretStr so no repr or log shows them.
    smtp_host: str | None = Field(default=None, validation_alias="SALESDASH_SMTP_HOST")
    smtp_port: int = Field(default=25, ge=1, le=65535, validation_alias="SALESDASH_SMTP_PORT")
    smtp_username: str | None = Field(default=None, validation_alias="SALESDASH_SMTP_USERNAME")
    smtp_password: SecretStr | None = Field(default=None, validation_alias="SALESDASH_SMTP_PASSWORD")
    smtp_starttls: bool = Field(default=False, validation_alias="SALESDASH_SMTP_STARTTLS")
    # a CA bundle to verify the server's certificate with (a private CA); unset: the system's
    smtp_ca_file: Path | None = Field(default=None, validation_alias="SALESDASH_SMTP_CA_FILE")
    smtp_from: str = Field(default="salesdash@localhost", validation_alias="SALESDASH_SMTP_FROM")
    smtp_timeout_s: float = Field(default=10, gt=0, validation_alias="SALESDASH_SMTP_TIMEOUT_SECONDS")
    # comma-separated; secret because a webhook URL often carries a token
    webhook_urls: SecretStr = Field(default=SecretStr(""), validation_alias="SALESDASH_WEBHOOK_URLS")
    webhook_secret: SecretStr | None = Field(default=None, validation_alias="SALESDASH_WEBHOOK_SECRET")
    notify_max_attempts: int = Field(default=8, ge=1, validation_alias="SALESDASH_NOTIFY_MAX_ATTEMPTS")
    notify_retry_base_s: float = Field(default=30, gt=0, validation_alias="SALESDASH_NOTIFY_RETRY_BASE_SECONDS")
    notify_retry_cap_s: float = Field(default=3600, gt=0, validation_alias="SALESDASH_NOTIFY_RETRY_CAP_SECONDS")
    # a delivery claimed by a worker that died is taken over after this long (longer than a batch can take)
    notify_lease_s: float = Field(default=300, gt=0, validation_alias="SALESDASH_NOTIFY_LEASE_SECONDS")
    # pause after each delivery: 0 in production; tests use it to kill a worker mid-batch
    notify_pause_ms: int = Field(default=0, ge=0, validation_alias="SALESDASH_NOTIFY_PAUSE_MS")
    low_stock_service_level: float = Field(
        default=0.95, gt=0.5, lt=1, validation_alias="SALESDASH_LOW_STOCK_SERVICE_LEVEL"
    )
    alert_cooldown_s: float = Field(default=3600, gt=0, validation_alias="SALESDASH_ALERT_COOLDOWN_SECONDS")
    alert_failed_job_rate: float = Field(default=0.2, gt=0, le=1, validation_alias="SALESDASH_ALERT_FAILED_JOB_RATE")
    alert_failed_job_min_runs: int = Field(default=5, ge=1, validation_alias="SALESDASH_ALERT_FAILED_JOB_MIN_RUNS")
    alert_window_s: float = Field(default=3600, gt=0, validation_alias="SALESDASH_ALERT_WINDOW_SECONDS")

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
    def alert_recipients(self) -> list[str]:
        """SALESDASH_ALERT_RECIPIENT: one address or several, comma-separated."""
        return [a.strip() for a in self.alert_recipient.split(",") if a.strip()]

    @property
    def mail_dir(self) -> Path:
        """Where `salesdash up`'s local SMTP sink keeps the mails when no SMTP server is configured."""
        return self.data_dir / "mail"

    @property
    def exports_dir(self) -> Path:
        """Where `export_analytics_data` writes its files and `GET /exports/{task_id}` reads them."""
        return self.data_dir / "exports"


@lru_cache
def get_settings() -> Settings:
    return Settings()
