"""The HTML page of a monthly report: one self-contained document (inline CSS, charts as inline SVG drawn here),
so opening it fetches nothing. Chart geometry is computed in Python; the Jinja2 template writes every value
through autoescaping, labels included."""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from db.queries.reports import HEADLINE, CategorySales, DayRevenue, MonthlyReport

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True, undefined=StrictUndefined
)

DAILY_WIDTH, DAILY_HEIGHT = 760, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 14, 30  # plot margins of the daily chart
CATEGORY_WIDTH, CATEGORY_ROW = 760, 28
_LABEL_W, _VALUE_W = 170, 110  # category name column, value text after the bar


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the category name, or the day
    value: str  # formatted, for the tooltip and the value text


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    plot_left: float = 0
    plot_right: float = 0


@dataclass(frozen=True)
class Kpi:
    label: str
    value: str
    previous_month: str
    month_change: str
    previous_year: str
    year_change: str


def money(value: Decimal | None) -> str:
    return "—" if value is None else f"{value:,.2f}"


def count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def percent(value: Decimal | None) -> str:
    return "—" if value is None else f"{value:+.1f}%"


def compact(value: float) -> str:
    """Axis labels: 950, 12.5k, 1.2M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above `value`, so gridlines fall on round numbers."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def daily_chart(days: Sequence[DayRevenue]) -> Chart:
    """Vertical bars, one per local day, on a y axis from 0 to a round maximum with four gridlines."""
    top = nice_ceiling(float(max((d.revenue for d in days), default=Decimal(0))))
    plot_w, plot_h = DAILY_WIDTH - _LEFT - _RIGHT, DAILY_HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        height = plot_h * float(day.revenue) / top
        bars.append(
            Bar(_LEFT + index * slot + slot * 0.1, _TOP + plot_h - height, slot * 0.8, height, str(day.day),
                money(day.revenue))
        )  # fmt: skip
    labelled = {0, len(days) - 1, *range(4, len(days), 5)}  # the 1st, 5th, 10th, ... and the last day
    x_ticks = [Tick(_LEFT + i * slot + slot / 2, str(days[i].day.day)) for i in sorted(labelled) if i < len(days)]
    y_ticks = [Tick(_TOP + plot_h * (1 - k / 4), compact(top * k / 4)) for k in range(5)]
    return Chart(DAILY_WIDTH, DAILY_HEIGHT, bars, x_ticks, y_ticks, _LEFT, DAILY_WIDTH - _RIGHT)


def category_chart(categories: Sequence[CategorySales]) -> Chart:
    """Horizontal bars, one row per category, longest for the highest revenue."""
    top = float(max((c.revenue for c in categories), default=Decimal(0))) or 1.0
    span = CATEGORY_WIDTH - _LABEL_W - _VALUE_W
    bars = [
        Bar(_LABEL_W, i * CATEGORY_ROW + 4, span * float(c.revenue) / top, CATEGORY_ROW - 8, c.category,
            money(c.revenue))
        for i, c in enumerate(categories)
    ]  # fmt: skip
    return Chart(CATEGORY_WIDTH, max(len(categories), 1) * CATEGORY_ROW, bars, [], [], _LABEL_W, _LABEL_W + span)


_KPI_LABELS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "revenue": ("Revenue", money),
    "orders": ("Orders", count),
    "average_order_value": ("Average order value", money),
    "units": ("Units sold", count),
    "customers": ("Customers", count),
    "new_customers": ("New customers", count),
    "returning_customers": ("Returning customers", count),
    "refunds": ("Refunds", count),
    "refunded_amount": ("Refunded amount", money),
}


def kpis(report: MonthlyReport) -> list[Kpi]:
    """The headline figures with their month-over-month and year-over-year changes."""
    rows = []
    for name in HEADLINE:
        label, show = _KPI_LABELS[name]
        mom, yoy = report.previous_month, report.previous_year
        rows.append(
            Kpi(label, show(getattr(report.figures, name)), show(getattr(mom.figures, name)),
                percent(mom.change_pct[name]), show(getattr(yoy.figures, name)), percent(yoy.change_pct[name]))
        )  # fmt: skip
    return rows


def render_monthly_report(report: MonthlyReport) -> str:
    month = report.period_start
    return _templates.get_template("monthly_report.html").render(
        report=report,
        title=f"{calendar.month_name[month.month]} {month.year}",
        kpis=kpis(report),
        daily=daily_chart(report.daily),
        categories=category_chart(report.top_categories),
        money=money,
        count=count,
        percent=percent,
    )
