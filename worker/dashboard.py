"""The dashboard service: each payload's arguments, cache key and computation. The API reads payloads through
the cache (`read`); warm_dashboard_cache computes the default set and writes it (`warm_requests`, `compute_all`).

A payload depends on the moment it is computed for: range payloads on the local date (a new day is a new key,
so "today" never answers with yesterday's numbers), hourly metrics on the current UTC hour. That part of the
moment is in the key as `asof`, as is the timezone of local days.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from db.dashboard_records import (
    CategoryBreakdown,
    CustomerSegments,
    DashboardRange,
    HourlyMetrics,
    LowStockProducts,
    Period,
    RankBy,
    SalesOverview,
    TopCategories,
    TopProducts,
)
from db.queries import dashboard as sql
from salesdash.config import get_settings
from worker import cache
from worker.cache import CacheEntry

P = TypeVar("P", bound=BaseModel)

DEFAULT_HOURS = 48
DEFAULT_TOP_LIMIT = 10


class DashboardArgumentError(ValueError):
    """An argument no payload exists for; `argument` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(_Args):
    pass


class RangeArgs(_Args):
    range: DashboardRange


class HourlyArgs(_Args):
    hours: int = Field(DEFAULT_HOURS, ge=1, le=sql.MAX_HOURS)


class TopArgs(RangeArgs):
    limit: int = Field(DEFAULT_TOP_LIMIT, ge=1, le=sql.MAX_TOP_LIMIT)
    by: RankBy = RankBy.REVENUE


@dataclass(frozen=True)
class Moment:
    """The instant a payload is computed for, and the store's timezone its local days are read in."""

    now: datetime
    tz: ZoneInfo

    @classmethod
    def current(cls, tz: ZoneInfo | None = None) -> Moment:
        return cls(datetime.now(UTC), tz or get_settings().tzinfo)

    @property
    def today(self) -> date:
        return self.now.astimezone(self.tz).date()

    @property
    def current_hour(self) -> datetime:
        return self.now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    def period(self, range_: DashboardRange) -> Period:
        start, end = range_.local_days(self.today)
        return Period(range=range_, timezone=self.tz.key, start_date=start, end_date=end)


Compute = Callable[[asyncpg.Connection, Any, Moment], Awaitable[P]]


@dataclass(frozen=True)
class DashboardQuery(Generic[P]):
    name: str
    args_model: type[_Args]
    payload_model: type[P]
    compute: Compute[P]
    asof: Callable[[Moment], dict[str, str]]  # the part of the moment the payload depends on, for its key

    def parse(self, raw: Mapping[str, Any]) -> _Args:
        try:
            return self.args_model.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            argument = ".".join(map(str, error["loc"])) or "arguments"
            raise DashboardArgumentError(argument, _explain(error)) from None


def _explain(error: Any) -> str:
    if error["type"] == "enum":
        return f"unknown value {error['input']!r}; expected {error['ctx']['expected']}"
    return str(error["msg"])


def _local_day(moment: Moment) -> dict[str, str]:
    return {"asof": moment.today.isoformat(), "tz": moment.tz.key}


def _utc_hour(moment: Moment) -> dict[str, str]:
    return {"asof": moment.current_hour.strftime("%Y-%m-%dT%H:00Z")}


def _timeless(moment: Moment) -> dict[str, str]:
    return {}


async def _overview(conn: asyncpg.Connection, args: RangeArgs, moment: Moment) -> SalesOverview:
    return await sql.sales_overview(conn, moment.period(args.range))


async def _hourly(conn: asyncpg.Connection, args: HourlyArgs, moment: Moment) -> HourlyMetrics:
    return await sql.hourly_metrics(conn, args.hours, moment.current_hour)


async def _top_products(conn: asyncpg.Connection, args: TopArgs, moment: Moment) -> TopProducts:
    return await sql.top_products(conn, moment.period(args.range), args.by, args.limit)


async def _top_categories(conn: asyncpg.Connection, args: TopArgs, moment: Moment) -> TopCategories:
    return await sql.top_categories(conn, moment.period(args.range), args.by, args.limit)


async def _breakdown(conn: asyncpg.Connection, args: RangeArgs, moment: Moment) -> CategoryBreakdown:
    return await sql.category_breakdown(conn, moment.period(args.range))


async def _segments(conn: asyncpg.Connection, args: NoArgs, moment: Moment) -> CustomerSegments:
    return await sql.customer_segments(conn)


async def _low_stock(conn: asyncpg.Connection, args: NoArgs, moment: Moment) -> LowStockProducts:
    return await sql.low_stock_products(conn)


SALES_OVERVIEW = DashboardQuery("sales_overview", RangeArgs, SalesOverview, _overview, _local_day)
HOURLY_METRICS = DashboardQuery("hourly_metrics", HourlyArgs, HourlyMetrics, _hourly, _utc_hour)
TOP_PRODUCTS = DashboardQuery("top_products", TopArgs, TopProducts, _top_products, _local_day)
TOP_CATEGORIES = DashboardQuery("top_categories", TopArgs, TopCategories, _top_categories, _local_day)
CATEGORY_BREAKDOWN = DashboardQuery("category_breakdown", RangeArgs, CategoryBreakdown, _breakdown, _local_day)
CUSTOMER_SEGMENTS = DashboardQuery("customer_segments", NoArgs, CustomerSegments, _segments, _timeless)
LOW_STOCK_PRODUCTS = DashboardQuery("low_stock_products", NoArgs, LowStockProducts, _low_stock, _timeless)
QUERIES: tuple[DashboardQuery[Any], ...] = (
    SALES_OVERVIEW,
    HOURLY_METRICS,
    TOP_PRODUCTS,
    TOP_CATEGORIES,
    CATEGORY_BREAKDOWN,
    CUSTOMER_SEGMENTS,
    LOW_STOCK_PRODUCTS,
)


@dataclass(frozen=True)
class DashboardRequest(Generic[P]):
    """One payload: a query, its validated arguments and the moment it is for."""

    query: DashboardQuery[P]
    args: _Args
    moment: Moment

    @property
    def canonical_args(self) -> str:
        return cache.canonical_args({**self.args.model_dump(mode="json"), **self.query.asof(self.moment)})

    @property
    def key(self) -> str:
        return cache.entry_key(self.query.name, self.canonical_args)


def request(query: DashboardQuery[P], raw_args: Mapping[str, Any], moment: Moment | None = None) -> DashboardRequest[P]:
    """Validate the arguments (DashboardArgumentError names the bad one) and fix the moment."""
    return DashboardRequest(query, query.parse(raw_args), moment or Moment.current())


async def compute_in(conn: asyncpg.Connection, req: DashboardRequest[P], generated_at: datetime) -> CacheEntry[P]:
    """Compute one payload on a connection already inside a read-only snapshot."""
    return _entry(
        req, generated_at, await sql.data_watermark(conn), await req.query.compute(conn, req.args, req.moment)
    )


def _entry(req: DashboardRequest[P], generated_at: datetime, watermark: datetime | None, data: P) -> CacheEntry[P]:
    return CacheEntry[req.query.payload_model](  # type: ignore[name-defined]
        query=req.query.name, args=req.canonical_args, generated_at=generated_at, data_watermark=watermark, data=data
    )


Progress = Callable[[float, str], Awaitable[None]]


async def compute_all(
    db: asyncpg.Pool, requests: Sequence[DashboardRequest[Any]], progress: Progress | None = None
) -> list[CacheEntry[Any]]:
    """Every payload from one REPEATABLE READ snapshot, so they agree with each other and share a watermark."""
    generated_at = cache.utc_now()
    entries: list[CacheEntry[Any]] = []
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        watermark = await sql.data_watermark(conn)
        for index, req in enumerate(requests):
            if progress is not None:
                await progress(index / len(requests), f"computing {req.query.name} ({req.canonical_args})")
            entries.append(_entry(req, generated_at, watermark, await req.query.compute(conn, req.args, req.moment)))
    return entries


async def _compute_counted(redis: Redis, db: asyncpg.Pool, req: DashboardRequest[P]) -> CacheEntry[P]:
    [entry] = await compute_all(db, [req])
    await cache.record_computation(redis, req.query.name)
    return entry


async def read(
    redis: Redis,
    db: asyncpg.Pool,
    query: DashboardQuery[P],
    raw_args: Mapping[str, Any],
    *,
    moment: Moment | None = None,
    ttl_s: float | None = None,
    lock_s: float | None = None,
) -> CacheEntry[P]:
    """A payload from the cache; on a miss, computed once under a lock however many callers miss together."""
    req = request(query, raw_args, moment)
    settings = get_settings()
    return await cache.read_through(
        redis,
        query.name,
        req.canonical_args,
        query.payload_model,
        lambda: _compute_counted(redis, db, req),
        ttl_s=ttl_s or settings.dashboard_cache_ttl_s,
        lock_s=lock_s or settings.dashboard_cache_lock_s,
    )


def warm_requests(moment: Moment) -> list[DashboardRequest[Any]]:
    """What warm_dashboard_cache keeps warm: every payload with its default arguments, for every range."""
    ranges = list(DashboardRange)
    by_range: list[tuple[DashboardQuery[Any], dict[str, Any]]] = [
        (query, {"range": r})
        for query in (SALES_OVERVIEW, TOP_PRODUCTS, TOP_CATEGORIES, CATEGORY_BREAKDOWN)
        for r in ranges
    ]
    once: list[tuple[DashboardQuery[Any], dict[str, Any]]] = [
        (HOURLY_METRICS, {"hours": DEFAULT_HOURS}),
        (CUSTOMER_SEGMENTS, {}),
        (LOW_STOCK_PRODUCTS, {}),
    ]
    return [request(query, args, moment) for query, args in by_range + once]
