"""GraphQL types of the dashboard payloads (db/dashboard_records.py), each with the cache entry's `generatedAt`
and `dataWatermark`. Money is the `Decimal` scalar, a string such as "1234.50"; ranges and `by` are the strings
the arguments take."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from db import dashboard_records as records
from worker.cache import CacheEntry


@strawberry.experimental.pydantic.type(model=records.Period)
class Period:
    range: str
    timezone: strawberry.auto
    start_date: strawberry.auto
    end_date: strawberry.auto


@strawberry.experimental.pydantic.type(model=records.HourlyBucket, all_fields=True)
class HourlyBucket:
    pass


@strawberry.experimental.pydantic.type(model=records.ProductSales, all_fields=True)
class ProductSales:
    pass


@strawberry.experimental.pydantic.type(model=records.CategorySales, all_fields=True)
class CategorySales:
    pass


@strawberry.experimental.pydantic.type(model=records.SegmentCount, all_fields=True)
class SegmentCount:
    pass


@strawberry.experimental.pydantic.type(model=records.LowStockProduct, all_fields=True)
class LowStockProduct:
    pass


@strawberry.experimental.pydantic.type(model=records.SalesOverview)
class SalesOverview:
    period: Period
    revenue: strawberry.auto
    orders: strawberry.auto
    paid_orders: strawberry.auto
    average_order_value: strawberry.auto
    units: strawberry.auto
    distinct_customers: strawberry.auto
    new_customers: strawberry.auto
    returning_customers: strawberry.auto
    cancelled_orders: strawberry.auto
    refunded_orders: strawberry.auto
    refunded_amount: strawberry.auto
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.HourlyMetrics)
class HourlyMetrics:
    hours: strawberry.auto
    buckets: list[HourlyBucket]
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.TopProducts)
class TopProducts:
    period: Period
    by: str
    limit: strawberry.auto
    products: list[ProductSales]
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.TopCategories)
class TopCategories:
    period: Period
    by: str
    limit: strawberry.auto
    categories: list[CategorySales]
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.CategoryBreakdown)
class CategoryBreakdown:
    period: Period
    revenue: strawberry.auto
    units: strawberry.auto
    categories: list[CategorySales]
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.CustomerSegments)
class CustomerSegments:
    customers: strawberry.auto
    segments: list[SegmentCount]
    generated_at: datetime
    data_watermark: datetime | None


@strawberry.experimental.pydantic.type(model=records.LowStockProducts)
class LowStockProducts:
    total: strawberry.auto
    products: list[LowStockProduct]
    generated_at: datetime
    data_watermark: datetime | None


def meta(entry: CacheEntry[Any]) -> dict[str, Any]:
    """The cache entry's fields every dashboard type adds to its payload's."""
    return {"generated_at": entry.generated_at, "data_watermark": entry.data_watermark}
