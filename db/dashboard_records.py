"""The dashboard's typed payloads (db/queries/dashboard.py computes them; the cache and GraphQL carry them).

Money is `numeric` in PostgreSQL and `Decimal` here, never float; in JSON (the cache, GraphQL) a Decimal is a
string such as "1234.50", so no digit is lost. Shares are ratios, not money: floats.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class DashboardRange(StrEnum):
    """A range of whole local days (in SALESDASH_TIMEZONE), today included."""

    TODAY = "today"
    YESTERDAY = "yesterday"
    LAST_7_DAYS = "last_7_days"
    LAST_30_DAYS = "last_30_days"
    MONTH_TO_DATE = "month_to_date"

    def local_days(self, today: date) -> tuple[date, date]:
        """First and last local day of the range, both included."""
        if self is DashboardRange.YESTERDAY:
            yesterday = today - timedelta(days=1)
            return yesterday, yesterday
        first = {
            DashboardRange.TODAY: today,
            DashboardRange.LAST_7_DAYS: today - timedelta(days=6),
            DashboardRange.LAST_30_DAYS: today - timedelta(days=29),
            DashboardRange.MONTH_TO_DATE: today.replace(day=1),
        }[self]
        return first, today


class RankBy(StrEnum):
    REVENUE = "revenue"
    UNITS = "units"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Period(_Record):
    range: DashboardRange
    timezone: str
    start_date: date  # first local day, included
    end_date: date  # last local day, included


class SalesOverview(_Record):
    period: Period
    revenue: Decimal  # paid, shipped and delivered orders
    orders: int  # every order, whatever its status
    paid_orders: int  # paid, shipped or delivered
    average_order_value: Decimal | None  # revenue / paid orders, to the cent; null without paid orders
    units: int  # units sold in paid, shipped and delivered orders
    distinct_customers: int  # customers with at least one order of any status
    new_customers: int  # of those, customers whose first order ever is in the range
    returning_customers: int  # the others: they had ordered before the range
    cancelled_orders: int
    refunded_orders: int
    refunded_amount: Decimal


class HourlyBucket(_Record):
    hour: datetime  # start of the UTC hour
    orders: int
    paid_orders: int
    revenue: Decimal
    units: int
    average_order_value: Decimal | None
    distinct_customers: int
    cancelled_orders: int
    refunded_orders: int
    refunded_amount: Decimal


class HourlyMetrics(_Record):
    hours: int
    buckets: list[HourlyBucket]  # one per hour, oldest first, the current hour last; hours without orders are 0


class ProductSales(_Record):
    product_id: int
    sku: str
    name: str
    category: str
    units: int
    revenue: Decimal
    orders: int


class TopProducts(_Record):
    period: Period
    by: RankBy
    limit: int
    products: list[ProductSales]  # best first; products without sales in the range are left out


class CategorySales(_Record):
    category: str
    units: int
    revenue: Decimal
    orders: int  # orders with at least one line in the category
    revenue_share: float  # of the range's revenue, 0-1


class TopCategories(_Record):
    period: Period
    by: RankBy
    limit: int
    categories: list[CategorySales]  # best first; categories without sales in the range are left out


class CategoryBreakdown(_Record):
    period: Period
    revenue: Decimal
    units: int
    categories: list[CategorySales]  # every category of the catalogue, by revenue


class SegmentCount(_Record):
    segment: str  # customers.segment; "unsegmented" for customers without one
    customers: int
    share: float  # of all customers, 0-1


class CustomerSegments(_Record):
    customers: int
    segments: list[SegmentCount]  # largest first


class LowStockProduct(_Record):
    product_id: int
    sku: str
    name: str
    category: str
    stock_quantity: int
    reorder_point: int  # demand-based, as check_low_stock_products found it (or its fixed threshold - 1)
    shortfall: int  # reorder point - stock: how far under (0 = exactly at it, or restocked since the check)
    lead_time_days: int


class LowStockProducts(_Record):
    total: int  # products the last check_low_stock_products run found low (`low_stock_state`)
    products: list[LowStockProduct]  # the largest shortfall first, at most LOW_STOCK_LIMIT
