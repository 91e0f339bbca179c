"""The summaries domain: the daily summary arrives once with the figures a direct SQL query gives, and triggering it
again sends nothing; a store in America/Los_Angeles counts exactly the orders of its local day across both DST
changes; the weekly report is stored in `reports`, served by the API, and sent once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst
from tests.notify_servers import HOST, MailSink, running_sink
from worker import client
from worker.jobs.summaries import send_daily_summary, weekly_performance_report

LA = "America/Los_Angeles"
COUNTED = "('paid', 'shipped', 'delivered')"


@pytest.fixture
def sink() -> Iterator[MailSink]:
    yield from running_sink()


async def customer(db: asyncpg.Pool, email: str) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO customers (email, name, country) VALUES ($1, 'Summary <Test>', 'US') "
            "ON CONFLICT (email) DO UPDATE SET country = 'US' RETURNING id",
            email,
        )
    )


async def product(db: asyncpg.Pool, sku: str, name: str, category: str) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO products (sku, name, category, price, cost, stock_quantity) VALUES ($1, $2, $3, 10, 5, 1000) "
            "ON CONFLICT (sku) DO UPDATE SET name = $2 RETURNING id",
            sku,
            name,
            category,
        )
    )


async def order(
    db: asyncpg.Pool, customer_id: int, at: datetime, lines: list[tuple[int, int, str]], status: str
) -> None:
    total = sum(q * Decimal(p) for _, q, p in lines)
    order_id = await db.fetchval(
        "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        customer_id,
        status,
        total,
        at,
    )
    for line_no, (product_id, quantity, price) in enumerate(lines, start=1):
        await db.execute(
            "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            order_id,
            line_no,
            product_id,
            quantity,
            Decimal(price),
            at,
        )


async def direct_figures(db: asyncpg.Pool, day: date, timezone: str) -> dict[str, Any]:
    """The day's figures straight from the tables, the local day taken by PostgreSQL's own time zone rules."""
    local = f"(o.created_at AT TIME ZONE '{timezone}')::date"
    row = await db.fetchrow(
        f"""SELECT coalesce(sum(o.total_amount) FILTER (WHERE o.status IN {COUNTED}), 0) AS revenue,
                   count(*) FILTER (WHERE o.status IN {COUNTED}) AS orders,
                   count(*) FILTER (WHERE o.status = 'refunded') AS refunds,
                   count(DISTINCT o.customer_id) FILTER (WHERE o.status IN {COUNTED}) AS customers,
                   (SELECT coalesce(sum(i.quantity), 0) FROM order_items i JOIN orders x
                       ON x.id = i.order_id AND x.created_at = i.created_at
                     WHERE (x.created_at AT TIME ZONE '{timezone}')::date = $1 AND x.status IN {COUNTED}) AS units
              FROM orders o WHERE {local} = $1""",
        day,
    )
    return dict(row)


async def stored_summary(db: asyncpg.Pool, day: date) -> dict[str, Any]:
    return dict(await db.fetchval("SELECT payload FROM notifications WHERE dedupe_key = $1", f"daily_summary:{day}"))


async def test_the_daily_summary_arrives_once_with_the_figures_of_direct_sql(
    db: asyncpg.Pool, clean_redis: Redis, sink: MailSink
) -> None:
    tz = get_settings().tzinfo
    yesterday = datetime.now(tz).date() - timedelta(days=1)
    noon = datetime.combine(yesterday, datetime.min.time(), tz) + timedelta(hours=12)
    new, regular = await customer(db, "daily-new@example.com"), await customer(db, "daily-regular@example.com")
    widget = await product(db, "DS-WIDGET", "Widget <script>alert(1)</script>", "Gadgets & Co")
    await order(db, regular, noon - timedelta(days=30), [(widget, 1, "5.00")], "delivered")
    await order(db, new, noon, [(widget, 3, "100000.50")], "paid")
    await order(db, regular, noon + timedelta(hours=1), [(widget, 2, "100000.50")], "shipped")
    await order(db, regular, noon + timedelta(hours=2), [(widget, 1, "100000.50")], "refunded")

    # other tests (test_cli, test_platform) may have recorded yesterday's summary, unsent: start from none
    await db.execute("DELETE FROM notifications WHERE dedupe_key = $1", f"daily_summary:{yesterday}")
    env = {
        "SALESDASH_SMTP_HOST": HOST,
        "SALESDASH_SMTP_PORT": str(sink.port),
        "SALESDASH_ALERT_RECIPIENT": "a@x.io,b@x.io",
    }
    for _ in range(2):  # triggering it again sends nothing
        await client.enqueue_task(clean_redis, OPERATOR, "send_daily_summary")
        assert arq_burst("notifications", extra_env=env).returncode == 0
    assert sorted(r for m in sink.messages for r in m.recipients) == ["a@x.io", "b@x.io"]

    summary, direct = await stored_summary(db, yesterday), await direct_figures(db, yesterday, tz.key)
    figures = summary["figures"]
    assert Decimal(figures["revenue"]) == direct["revenue"] and figures["orders"] == direct["orders"]
    assert figures["units"] == direct["units"] and figures["refunds"] == direct["refunds"]
    assert figures["customers"] == direct["customers"]
    assert figures["new_customers"] + figures["returning_customers"] == figures["customers"]
    assert Decimal(figures["average_order_value"]) == round(direct["revenue"] / direct["orders"], 2)
    assert summary["top_products"][0]["sku"] == "DS-WIDGET"  # priced to lead whatever else the day sold
    html = sink.messages[0].html
    assert "&lt;script&gt;" in html and "<script>" not in html and "Gadgets &amp; Co" in html
    text = sink.messages[0].text
    assert f"Daily summary for {yesterday}" in text and "7-day average" in text


@pytest.mark.parametrize(
    ("day", "hours"),
    [(date(2026, 3, 8), 23), (date(2026, 11, 1), 25)],  # DST starts / ends in Los Angeles
)
async def test_a_los_angeles_store_counts_exactly_its_local_day_across_dst(
    db: asyncpg.Pool, day: date, hours: int
) -> None:
    buyer = await customer(db, "la-store@example.com")
    thing = await product(db, "LA-THING", "LA thing", "LA")
    start_utc = datetime(day.year, day.month, day.day, 8, tzinfo=UTC)  # local midnight, PST (UTC-8)
    if day.month == 11:
        start_utc = datetime(day.year, day.month, day.day, 7, tzinfo=UTC)  # local midnight, still PDT (UTC-7)
    end_utc = start_utc + timedelta(hours=hours)
    inside = [start_utc, start_utc + timedelta(hours=hours / 2), end_utc - timedelta(seconds=1)]
    outside = [start_utc - timedelta(seconds=1), end_utc]
    for at in inside + outside:
        await order(db, buyer, at, [(thing, 1, "7.00")], "paid")

    ctx = {"db": db, "settings": get_settings().model_copy(update={"timezone": LA})}
    result = await send_daily_summary(ctx, day=day)
    summary = await stored_summary(db, day)
    assert datetime.fromisoformat(summary["starts_at"]) == start_utc
    assert datetime.fromisoformat(summary["ends_at"]) == end_utc  # a 23- or 25-hour day
    direct = await direct_figures(db, day, LA)
    assert summary["figures"]["orders"] == direct["orders"] >= len(inside)
    ours = await db.fetchval(
        "SELECT count(*) FROM orders WHERE customer_id = $1 AND created_at >= $2 AND created_at < $3",
        buyer,
        start_utc,
        end_utc,
    )
    assert ours == len(inside) and result["orders"] == direct["orders"]


async def test_the_weekly_report_is_stored_served_and_sent_once(
    db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], sink: MailSink
) -> None:
    monday, before = date(2025, 3, 3), date(2025, 2, 24)  # 2025-W10 and the week before
    buyer = await customer(db, "weekly@example.com")
    rising, falling = (
        await product(db, "WK-RISE", "Rising <i>star</i>", "W"),
        await product(db, "WK-FALL", "Falling", "W"),
    )
    for start, rise, fall in ((before, 1, 9), (monday, 8, 2)):
        at = datetime(start.year, start.month, start.day, 15, tzinfo=UTC)
        await order(db, buyer, at, [(rising, rise, "10.00"), (falling, fall, "10.00")], "delivered")
    await db.execute(
        "INSERT INTO customer_segment_history (customer_id, from_segment, to_segment, changed_at) "
        "VALUES ($1, 'new', 'loyal', $2), ($1, 'loyal', 'champions', $3)",
        buyer,
        datetime(2025, 3, 4, 2, tzinfo=UTC),
        datetime(2025, 3, 1, 2, tzinfo=UTC),  # the week before: not counted
    )
    ctx = {"db": db, "settings": get_settings().model_copy(update={"smtp_host": HOST, "smtp_port": sink.port})}
    first = await weekly_performance_report(ctx, week="2025-W10")
    again = await weekly_performance_report(ctx, week="2025-W10")
    assert first["week"] == "2025-W10" and again["replaced"] and again["report_id"] == first["report_id"]
    assert first["delivery"]["email"]["sent"] == 1 and again["notification_id"] is None and len(sink.messages) == 1

    answer = await app_client.get(f"/reports/{first['report_id']}", headers=auth["read"])
    assert answer.status_code == 200, answer.text
    payload = answer.json()["payload"]
    assert payload["kind"] == "weekly" and payload["period_start"] == str(monday) and len(payload["daily"]) == 7
    assert payload["top_movers"][0]["sku"] == "WK-RISE" and Decimal(payload["top_movers"][0]["change"]) == 70
    assert payload["bottom_movers"][0]["sku"] == "WK-FALL" and Decimal(payload["bottom_movers"][0]["change"]) == -70
    assert payload["segment_migration"] == [{"from_segment": "new", "to_segment": "loyal", "customers": 1}]
    assert Decimal(payload["previous_week"]["change_pct"]["revenue"]) == 0  # 100 then, 100 now
    listed = await app_client.get("/reports", params={"kind": "weekly"}, headers=auth["read"])
    assert first["report_id"] in {r["id"] for r in listed.json()}
    html = sink.messages[0].html
    assert "Rising &lt;i&gt;star&lt;/i&gt;" in html and "<svg" in html
