"""`check_low_stock_products`: demand-based reorder points (db/queries/stock.py), one alert per crossing, one digest
per run, recorded in the transaction that records the crossings and then delivered."""

from __future__ import annotations

import hashlib
from datetime import date, datetime, time, timedelta
from statistics import NormalDist
from typing import Any

from db.queries.notifications import NewNotification
from db.queries.stock import DEMAND_DAYS, LowProduct, evaluate_low_stock, link_alert, lock_low_stock
from salesdash.config import Settings
from worker.delivery import deliver_due
from worker.mail import Document, Table, render_html, render_text
from worker.outbox import notify


def _number(value: object) -> str:
    return "—" if value is None else str(value)


def low_stock_digest(products: list[LowProduct], day: date, settings: Settings) -> NewNotification:
    crossed = [p for p in products if p.crossed]
    ids = ",".join(str(p.product_id) for p in sorted(crossed, key=lambda p: p.product_id))
    rows = [
        [p.sku, p.name, str(p.stock_quantity), str(p.reorder_point), str(p.safety_stock), str(p.mean_daily_demand),
         _number(p.days_of_cover), str(p.lead_time_days), _number(p.low_stock_threshold)]
        for p in crossed
    ]  # fmt: skip
    noun = "product" if len(crossed) == 1 else "products"
    document = Document(
        title=f"Low stock: {len(crossed)} {noun} fell to their reorder point",
        paragraphs=[
            f"Demand over the {DEMAND_DAYS} days before {day}, service level {settings.low_stock_service_level:.0%}. "
            f"{len(products)} products are low in all; only those that fell since the last check are listed."
        ],
        tables=[
            Table(
                "Newly low",
                [
                    "SKU",
                    "Product",
                    "Stock",
                    "Reorder point",
                    "Safety stock",
                    "Daily demand",
                    "Days of cover",
                    "Lead time (days)",
                    "Threshold",
                ],
                rows,
            )
        ],  # fmt: skip
    )
    return NewNotification(
        kind="low_stock",
        severity="warning",
        subject=document.title,
        text=render_text(document),
        html=render_html(document),
        payload={"day": day.isoformat(), "low": len(products), "products": [p.sku for p in crossed]},
        dedupe_key=f"low_stock:{day}:{hashlib.md5(ids.encode()).hexdigest()}",
    )


async def check_low_stock_products(ctx: dict[str, Any], *, as_of: date | None = None) -> dict[str, Any]:
    """Evaluate as of the morning of `as_of` (default today in SALESDASH_TIMEZONE): demand of the days before it."""
    settings: Settings = ctx["settings"]
    tz = settings.tzinfo
    day = as_of or datetime.now(tz).date()
    start = datetime.combine(day - timedelta(days=DEMAND_DAYS), time(), tz)
    end = datetime.combine(day, time(), tz)
    z = NormalDist().inv_cdf(settings.low_stock_service_level)
    notification_id = None
    async with ctx["db"].acquire() as conn, conn.transaction():
        await lock_low_stock(conn)
        products = await evaluate_low_stock(conn, start, end, settings.timezone, z)
        crossed = [p for p in products if p.crossed]
        if crossed:
            notification_id = await notify(conn, settings, low_stock_digest(products, day, settings))
            if notification_id is not None:
                await link_alert(conn, notification_id, [p.product_id for p in crossed])
    delivery = await deliver_due(ctx["db"], settings, [notification_id]) if notification_id else None
    return {
        "day": day.isoformat(),
        "low_stock_products": len(products),
        "newly_low": [p.sku for p in crossed],
        "notification_id": notification_id,
        "delivery": delivery,
    }
