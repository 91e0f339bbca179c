"""Inventory jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from db.queries.stock import count_low_stock, record_low_stock_alerts


async def check_low_stock_products(ctx: dict[str, Any]) -> dict[str, Any]:
    today = datetime.now(ctx["settings"].tzinfo).date()
    async with ctx["db"].acquire() as conn:
        low = await count_low_stock(conn)
        created = await record_low_stock_alerts(conn, ctx["settings"].alert_recipient, today)
    return {"low_stock_products": low, "alerts_created": created}
