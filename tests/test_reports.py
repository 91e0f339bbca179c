"""The reports domain: `generate_monthly_report` run by a real analytics worker, every figure checked against a
direct aggregate over `orders`, local months in the store's timezone, re-runs that replace, a self-contained
HTML page, and the `/reports` routes.

The crafted shop lives in 2019 (partitions made here and dropped after), which no seed reaches, so the exact
hand-counted figures hold whatever else the suite has loaded."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from api.reports import prefers_html
from db.queries.reports import MonthlyReport, lock_report_period
from salesdash.auth import OPERATOR
from salesdash.config import Settings
from salesdash.periods import Month, parse_day_or_month
from tests.conftest import arq_burst, wait_for
from tests.test_api import queue_snapshot
from worker import client
from worker.jobs.reports import generate_monthly_report
from worker.report_page import nice_ceiling

COUNTED = ("paid", "shipped", "delivered")
AUCKLAND = "Pacific/Auckland"
NASTY = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


@dataclass
class Shop:
    tag: str
    customers: dict[str, int]
    products: dict[str, int]


async def _add_order(
    conn: asyncpg.Connection, customer: int, status: str, at: datetime, lines: list[tuple[int, int, str]]
) -> int:
    total = sum(Decimal(price) * qty for _, qty, price in lines)
    order_id: int = await conn.fetchval(
        "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        customer,
        status,
        total,
        at,
    )
    await conn.executemany(
        """INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        [(order_id, n, product, qty, Decimal(price), at) for n, (product, qty, price) in enumerate(lines, 1)],
    )
    return order_id


async def _partitions(conn: asyncpg.Connection, months: list[str]) -> list[str]:
    """Make the months' partitions; returns the ones made here (to drop after)."""
    made = []
    for month in months:
        for parent in ("orders", "order_items"):
            name = f"{parent}_p{month.replace('-', '_')}"
            if await conn.fetchval("SELECT to_regclass($1)", name) is None:
                made.append(name)
    for month in months:
        first = Month.parse(month).first_day
        await conn.execute("SELECT ensure_order_partitions($1, $1)", first)
    return made


@pytest.fixture(scope="module")
async def shop(db: asyncpg.Pool) -> AsyncIterator[Shop]:
    """Feb and Mar 2019 (Mar 2018 stays empty, for the year-over-year comparison):

    - A orders in Feb (1 ms before March, UTC) and on 31 Mar 23:59:59: a returning customer
    - B orders at exactly 1 Mar 00:00 UTC (new), has a pending order, and one at 1 Apr 00:00 (outside)
    - C has only a cancelled order in March; D only a refunded one; E (segment "champions") a shipped one
    """
    tag = uuid.uuid4().hex[:8]
    async with db.acquire() as conn:
        made = await _partitions(conn, ["2018-03", "2019-02", "2019-03", "2019-04"])
        customers = {
            key: await conn.fetchval(
                "INSERT INTO customers (email, name, country, segment, created_at) VALUES ($1, $2, 'NZ', $3, $4) "
                "RETURNING id",
                f"{key}-{tag}@reports.test",
                f"Customer {key}",
                "champions" if key == "E" else None,
                utc(2019, 1, 1),
            )
            for key in "ABCDE"
        }
        products = {
            key: await conn.fetchval(
                "INSERT INTO products (sku, name, category, price, cost) VALUES ($1, $2, $3, 10, 5) RETURNING id",
                f"RPT-{key}-{tag}",
                name,
                category,
            )
            for key, name, category in [
                ("mug", "Mug", f"Kitchen {tag}"),
                ("rake", "Rake", f"Garden {tag}"),
                ("odd", NASTY, NASTY + tag),
            ]
        }
        c, p = customers, products
        await _add_order(conn, c["A"], "paid", utc(2019, 2, 28, 23, 59, 59, 999000), [(p["mug"], 2, "12.50")])
        await _add_order(conn, c["B"], "paid", utc(2019, 3, 1), [(p["mug"], 1, "12.50"), (p["rake"], 1, "30.00")])
        await _add_order(conn, c["A"], "delivered", utc(2019, 3, 31, 23, 59, 59), [(p["odd"], 3, "7.25")])
        await _add_order(conn, c["B"], "pending", utc(2019, 3, 12), [(p["rake"], 1, "30.00")])
        await _add_order(conn, c["B"], "paid", utc(2019, 4, 1), [(p["rake"], 5, "30.00")])
        await _add_order(conn, c["C"], "cancelled", utc(2019, 3, 15), [(p["mug"], 4, "12.50")])
        await _add_order(conn, c["D"], "refunded", utc(2019, 3, 20), [(p["rake"], 2, "30.00")])
        await _add_order(conn, c["E"], "shipped", utc(2019, 3, 10, 12), [(p["rake"], 2, "29.00"), (p["mug"], 1, "11")])
    yield Shop(tag, customers, products)
    async with db.acquire() as conn:
        for table in made:  # leave the partition layout as it was, for the retention tests
            await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute("DELETE FROM reports WHERE period_start < '2020-01-01'")


# ---- direct aggregates over orders: the yardstick every report figure is held to ------------------------------


async def direct_figures(db: asyncpg.Pool, start: datetime, end: datetime) -> dict[str, Any]:
    """The figures written independently of db/queries/reports.py: new customers from each one's first order."""
    row = await db.fetchrow(
        """WITH counted AS (SELECT * FROM orders WHERE status IN ('paid', 'shipped', 'delivered')),
                firsts AS (SELECT customer_id, min(created_at) AS first_at FROM counted GROUP BY customer_id)
           SELECT (SELECT coalesce(sum(total_amount), 0) FROM counted WHERE created_at >= $1 AND created_at < $2)
                      AS revenue,
                  (SELECT count(*) FROM counted WHERE created_at >= $1 AND created_at < $2) AS orders,
                  (SELECT coalesce(sum(i.quantity), 0) FROM order_items i
                     JOIN counted o ON o.id = i.order_id AND o.created_at = i.created_at
                    WHERE o.created_at >= $1 AND o.created_at < $2) AS units,
                  (SELECT count(*) FROM orders WHERE created_at >= $1 AND created_at < $2) AS orders_placed,
                  (SELECT count(*) FROM orders WHERE created_at >= $1 AND created_at < $2 AND status = 'cancelled')
                      AS cancelled_orders,
                  (SELECT count(*) FROM orders WHERE created_at >= $1 AND created_at < $2 AND status = 'refunded')
                      AS refunds,
                  (SELECT coalesce(sum(total_amount), 0) FROM orders
                    WHERE created_at >= $1 AND created_at < $2 AND status = 'refunded') AS refunded_amount,
                  (SELECT count(DISTINCT customer_id) FROM counted WHERE created_at >= $1 AND created_at < $2)
                      AS customers,
                  (SELECT count(*) FROM firsts WHERE first_at >= $1 AND first_at < $2) AS new_customers""",
        start,
        end,
    )
    figures = dict(row)
    figures["returning_customers"] = figures["customers"] - figures["new_customers"]
    figures["average_order_value"] = round(figures["revenue"] / figures["orders"], 2) if figures["orders"] else None
    return figures


async def direct_daily(db: asyncpg.Pool, start: datetime, end: datetime, tz: str) -> dict[date, Decimal]:
    rows = await db.fetch(
        """SELECT (created_at AT TIME ZONE $3)::date AS day, sum(total_amount) AS revenue FROM orders
            WHERE created_at >= $1 AND created_at < $2 AND status IN ('paid', 'shipped', 'delivered') GROUP BY 1""",
        start,
        end,
        tz,
    )
    return {r["day"]: r["revenue"] for r in rows}


async def direct_sales(db: asyncpg.Pool, start: datetime, end: datetime, key: str) -> list[tuple[Any, ...]]:
    """(key, units, revenue, orders) per product id or category, best first."""
    column = {"product": "i.product_id", "category": "p.category"}[key]
    rows = await db.fetch(
        f"""SELECT {column} AS key, sum(i.quantity) AS units, sum(i.quantity * i.unit_price) AS revenue,
                   count(DISTINCT o.id) AS orders
              FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
              JOIN products p ON p.id = i.product_id
             WHERE o.created_at >= $1 AND o.created_at < $2 AND o.status IN ('paid', 'shipped', 'delivered')
             GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT 10""",
        start,
        end,
    )
    return [tuple(r) for r in rows]


async def direct_segments(db: asyncpg.Pool, start: datetime, end: datetime) -> set[tuple[Any, ...]]:
    rows = await db.fetch(
        """SELECT c.segment, count(DISTINCT c.id), count(*), sum(o.total_amount)
             FROM orders o JOIN customers c ON c.id = o.customer_id
            WHERE o.created_at >= $1 AND o.created_at < $2 AND o.status IN ('paid', 'shipped', 'delivered')
            GROUP BY 1""",
        start,
        end,
    )
    return {tuple(r) for r in rows}


async def stored(db: asyncpg.Pool, month: str) -> tuple[asyncpg.Record, MonthlyReport]:
    first = Month.parse(month).first_day
    row = await db.fetchrow("SELECT * FROM reports WHERE kind = 'monthly' AND period_start = $1", first)
    assert row is not None, f"no monthly report for {month}"
    return row, MonthlyReport.model_validate(row["payload"])


async def assert_matches_orders(db: asyncpg.Pool, report: MonthlyReport) -> None:
    start, end = report.starts_at, report.ends_at
    assert report.figures.model_dump() == await direct_figures(db, start, end)
    daily = await direct_daily(db, start, end, report.timezone)
    assert [d.day for d in report.daily] == [
        report.period_start + timedelta(days=n) for n in range((report.period_end - report.period_start).days + 1)
    ]
    assert {d.day: d.revenue for d in report.daily if d.revenue} == daily
    assert sum(d.revenue for d in report.daily) == report.figures.revenue
    products = [(p.product_id, p.units, p.revenue, p.orders) for p in report.top_products]
    assert products == await direct_sales(db, start, end, "product")
    categories = [(c.category, c.units, c.revenue, c.orders) for c in report.top_categories]
    assert categories == await direct_sales(db, start, end, "category")
    segments = {(s.segment, s.customers, s.orders, s.revenue) for s in report.segments}
    assert segments == await direct_segments(db, start, end)
    for comparison, months_back in ((report.previous_month, 1), (report.previous_year, 12)):
        earlier = Month.parse(report.month).plus(-months_back)
        assert comparison.month == str(earlier)
        bounds = earlier.bounds(ZoneInfo(report.timezone))
        assert comparison.figures.model_dump() == await direct_figures(db, *bounds)


# ---- the job, run by real workers -----------------------------------------------------------------------------


async def test_monthly_report_figures_equal_direct_aggregates(
    shop: Shop, db: asyncpg.Pool, clean_redis: Redis, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    body = {"task_name": "generate_monthly_report", "kwargs": {"month": "2019-03"}}
    accepted = await app_client.post("/jobs", json=body, headers=auth["trigger"])
    assert accepted.status_code == 202, accepted.text
    run = arq_burst("analytics")
    assert run.returncode == 0, run.stdout + run.stderr

    status = await client.job_status(clean_redis, db, accepted.json()["task_id"])
    assert status.status == "complete", status
    row, report = await stored(db, "2019-03")
    assert status.result["report_id"] == row["id"] and status.result["month"] == "2019-03"
    assert row["job_id"] == status.task_id and row["period_end"] == date(2019, 3, 31)
    assert (report.starts_at, report.ends_at) == (utc(2019, 3, 1), utc(2019, 4, 1))
    assert report.complete and report.timezone == "UTC"
    await assert_matches_orders(db, report)

    # the crafted shop, counted by hand: B's order at 1 Mar 00:00 is in, A's 1 ms before and B's on 1 Apr are out
    f = report.figures
    # 42.50 (B) + 21.75 (A) + 69.00 (E) over 3 orders; 2 + 3 + 3 units
    assert (f.revenue, f.orders, f.units, f.average_order_value) == (Decimal("133.25"), 3, 8, Decimal("44.42"))
    assert (f.orders_placed, f.cancelled_orders, f.refunds, f.refunded_amount) == (6, 1, 1, Decimal("60.00"))
    assert (f.customers, f.new_customers, f.returning_customers) == (3, 2, 1)  # A returns; B and E are new
    assert report.previous_month.figures.revenue == Decimal("25.00")
    assert report.previous_month.change_pct["revenue"] == Decimal("433.0")  # (133.25 - 25) / 25
    assert report.previous_year.figures.orders == 0 and report.previous_year.change_pct["revenue"] is None
    assert {(s.segment, s.customers) for s in report.segments} == {(None, 2), ("champions", 1)}
    assert report.daily[0].revenue == Decimal("42.50") and report.daily[-1].revenue == Decimal("21.75")
    garden, kitchen, odd = f"Garden {shop.tag}", f"Kitchen {shop.tag}", NASTY + shop.tag
    assert [(c.category, c.revenue) for c in report.top_categories] == [
        (garden, Decimal("88.00")),
        (kitchen, Decimal("23.50")),
        (odd, Decimal("21.75")),
    ]
    assert [p.name for p in report.top_products] == ["Rake", "Mug", NASTY]


async def test_running_twice_replaces_the_report(shop: Shop, db: asyncpg.Pool, clean_redis: Redis) -> None:
    """Two runs for one month, queued together: the worker runs them side by side, the advisory lock makes them
    take turns, and one row remains, written by the later one."""
    jobs = [await client.enqueue_task(clean_redis, OPERATOR, "generate_monthly_report", ["2019-02"]) for _ in "12"]
    assert arq_burst("analytics").returncode == 0
    results = [(await client.job_status(clean_redis, db, j.task_id)).result for j in jobs]
    assert sorted(r["replaced"] for r in results) == [False, True]
    assert results[0]["report_id"] == results[1]["report_id"]
    rows = await db.fetch("SELECT id, job_id FROM reports WHERE kind = 'monthly' AND period_start = '2019-02-01'")
    later = next(j for j, r in zip(jobs, results, strict=True) if r["replaced"])
    assert [(r["id"], r["job_id"]) for r in rows] == [(results[0]["report_id"], later.task_id)]
    _, report = await stored(db, "2019-02")
    assert report.figures.revenue == Decimal("25.00") and report.figures.new_customers == 1


async def test_a_run_waits_while_another_holds_its_month(shop: Shop, db: asyncpg.Pool) -> None:
    """The lock is what makes concurrent runs take turns; giving the holder's connection back to the pool
    releases it (the pool's reset), which is also how a failed or aborted run lets go."""
    ctx = {"db": db, "settings": Settings(SALESDASH_TIMEZONE="UTC")}
    async with db.acquire() as holder:
        await lock_report_period(holder, "monthly", date(2019, 3, 1))
        run = asyncio.create_task(generate_monthly_report(ctx, month="2019-03"))
        await wait_for(
            lambda: db.fetchval(
                """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
            )
        )
        assert not run.done()
    result = await asyncio.wait_for(run, 30)
    assert result["month"] == "2019-03" and result["report_id"]


async def test_a_store_in_auckland_gets_its_local_month(db: asyncpg.Pool, clean_redis: Redis) -> None:
    """2026-10-31 12:00 UTC is 1 November, 01:00 in Auckland: in that store's November report, not October's."""
    async with db.acquire() as conn:
        customer = await conn.fetchval(
            "INSERT INTO customers (email, name, country) VALUES ($1, 'Kiwi', 'NZ') RETURNING id",
            f"kiwi-{uuid.uuid4().hex[:8]}@reports.test",
        )
        product = await conn.fetchval(
            "INSERT INTO products (sku, name, category, price, cost) VALUES ($1, 'Jandals', 'Beach', 20, 8) "
            "RETURNING id",
            f"RPT-NZ-{uuid.uuid4().hex[:8]}",
        )
        boundary = await _add_order(conn, customer, "paid", utc(2026, 10, 31, 12), [(product, 1, "777.77")])
    jobs = [
        await client.enqueue_task(clean_redis, OPERATOR, "generate_monthly_report", kwargs={"month": month})
        for month in ("2026-10", "2026-11")
    ]
    run = arq_burst("analytics", extra_env={"SALESDASH_TIMEZONE": AUCKLAND})
    assert run.returncode == 0, run.stdout + run.stderr
    for job in jobs:
        assert (await client.job_status(clean_redis, db, job.task_id)).status == "complete"

    _, november = await stored(db, "2026-11")
    assert november.timezone == AUCKLAND
    assert (november.starts_at, november.ends_at) == (utc(2026, 10, 31, 11), utc(2026, 11, 30, 11))
    await assert_matches_orders(db, november)
    assert november.daily[0].day == date(2026, 11, 1) and november.daily[0].revenue >= Decimal("777.77")
    _, october = await stored(db, "2026-10")
    assert october.ends_at == november.starts_at and october.daily[-1].day == date(2026, 10, 31)
    await assert_matches_orders(db, october)
    in_october = await db.fetchval(
        "SELECT count(*) FROM orders WHERE id = $1 AND created_at >= $2 AND created_at < $3",
        boundary,
        october.starts_at,
        october.ends_at,
    )
    assert in_october == 0


async def test_without_a_month_it_reports_the_previous_local_month(db: asyncpg.Pool) -> None:
    """What the cron run does (no arguments), called in-process with a store timezone ahead of UTC."""
    ctx = {"db": db, "settings": Settings(SALESDASH_TIMEZONE=AUCKLAND)}
    result = await generate_monthly_report(ctx)
    expected = Month.current(ZoneInfo(AUCKLAND)).plus(-1)
    assert result["month"] == str(expected) and result["timezone"] == AUCKLAND and result["complete"] is True
    _, report = await stored(db, str(expected))
    assert report.period_start == expected.first_day
    await assert_matches_orders(db, report)


# ---- bad arguments: refused before anything is enqueued ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"month": "2026-13"}, "expected a month as YYYY-MM"),
        ({"month": "26-10"}, "expected a month as YYYY-MM"),
        ({"month": f"{datetime.now(UTC).year + 1}-01"}, "is in the future"),
        ({"month": 202610}, "valid string"),
        ({"months": "2026-10"}, "months: Extra inputs are not permitted"),
    ],
)
async def test_bad_months_are_refused_and_nothing_is_enqueued(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]], kwargs: Any, problem: str
) -> None:
    before = await queue_snapshot(clean_redis)
    body = {"task_name": "generate_monthly_report", "kwargs": kwargs}
    response = await app_client.post("/jobs", json=body, headers=auth["trigger"])
    assert response.status_code == 422
    assert problem in response.json()["detail"] and "generate_monthly_report" in response.json()["detail"]
    assert await queue_snapshot(clean_redis) == before


# ---- the HTML page ---------------------------------------------------------------------------------------------


async def test_the_page_is_self_contained_with_svg_charts_and_escaped_values(shop: Shop, db: asyncpg.Pool) -> None:
    ctx = {"db": db, "settings": Settings(SALESDASH_TIMEZONE="UTC")}
    await generate_monthly_report(ctx, month="2019-03")
    row, _ = await stored(db, "2019-03")
    html: str = row["html"]
    assert html.startswith("<!doctype html>") and "March 2019" in html
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    assert len(svgs) == 2  # daily revenue and top categories
    assert svgs[0].count('<rect class="bar"') == 31 and svgs[1].count('<rect class="bar"') == 3
    assert "133.25" in html and "+433.0%" in html
    # nothing is fetched from elsewhere: no URL at all, no external resource reference of any kind
    assert not re.search(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html and "url(" not in html and "@import" not in html
    assert not re.search(r"<(?:script|link|img|iframe|object|embed)\b", html, re.I)
    # every value is escaped, in the tables and inside the SVG labels and tooltips
    assert NASTY not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;img" in html
    assert svgs[1].count("&lt;script&gt;") == 2  # the bar's label and its tooltip


# ---- the routes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def reports_of_2019(shop: Shop, db: asyncpg.Pool) -> dict[str, int]:
    ctx = {"db": db, "settings": Settings(SALESDASH_TIMEZONE="UTC")}
    ids = {}
    for month in ("2019-02", "2019-03", "2019-04"):
        ids[month] = (await generate_monthly_report(ctx, month=month))["report_id"]
    return ids


async def test_list_filters_by_kind_and_period_newest_first(
    reports_of_2019: dict[str, int], app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    async def ids(**query: Any) -> list[int]:
        response = await app_client.get("/reports", params=query, headers=auth["read"])
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()]

    r = reports_of_2019
    assert await ids(kind="monthly", **{"from": "2019-02", "to": "2019-04"}) == [
        r["2019-04"],
        r["2019-03"],
        r["2019-02"],
    ]
    assert await ids(**{"from": "2019-03", "to": "2019-03"}) == [r["2019-03"]]
    assert await ids(**{"from": "2019-03-31", "to": "2019-04-01"}) == [r["2019-04"], r["2019-03"]]
    assert await ids(**{"from": "2019-02", "to": "2019-04", "limit": 2}) == [r["2019-04"], r["2019-03"]]
    assert await ids(**{"from": "2019-05", "to": "2019-12"}) == []
    listed = (await app_client.get("/reports", params={"to": "2019-03"}, headers=auth["read"])).json()
    assert [x["id"] for x in listed][:2] == [r["2019-03"], r["2019-02"]]
    assert set(listed[0]) == {"id", "kind", "period_start", "period_end", "job_id", "created_at"}
    assert listed[0]["period_start"] == "2019-03-01" and listed[0]["period_end"] == "2019-03-31"


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"kind": "daily"}, "kind"),
        ({"from": "2019-13"}, "from"),
        ({"to": "March"}, "to"),
        ({"from": "2019-02-30"}, "from"),
        ({"from": "2019-05", "to": "2019-04"}, "from"),
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
async def test_list_refuses_bad_parameters_naming_them(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], query: dict[str, Any], named: str
) -> None:
    response = await app_client.get("/reports", params=query, headers=auth["read"])
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"{named}:") if isinstance(detail, str) else detail[0]["loc"] == ["query", named]


async def test_one_report_as_json_or_as_its_page(
    reports_of_2019: dict[str, int], db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    report_id = reports_of_2019["2019-03"]
    as_json = await app_client.get(f"/reports/{report_id}", headers=auth["read"])
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    body = as_json.json()
    assert body["id"] == report_id and body["kind"] == "monthly" and "html" not in body
    assert body["payload"]["figures"]["revenue"] == "133.25" and body["payload"]["month"] == "2019-03"

    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept in ("text/html", browser):
        page = await app_client.get(f"/reports/{report_id}", headers={**auth["read"], "Accept": accept})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == await db.fetchval("SELECT html FROM reports WHERE id = $1", report_id)
        assert "default-src 'none'" in page.headers["content-security-policy"]
    json_first = {**auth["read"], "Accept": "application/json, text/html;q=0.5"}
    assert (await app_client.get(f"/reports/{report_id}", headers=json_first)).json()["id"] == report_id


@pytest.mark.parametrize(
    ("path", "status"),
    [("/reports/999999999999", 404), ("/reports/abc", 422), ("/reports/0", 422), (f"/reports/{2**63}", 422)],
)
async def test_unknown_and_malformed_ids(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], path: str, status: int
) -> None:
    response = await app_client.get(path, headers=auth["read"])
    assert response.status_code == status
    detail = response.json()["detail"]
    assert "no report with id" in detail if status == 404 else response.json()["problems"][0]["field"] == "report_id"


async def test_reports_need_a_read_token(app_client: httpx.AsyncClient) -> None:
    for path in ("/reports", "/reports/1"):
        response = await app_client.get(path)
        assert response.status_code == 401 and response.json()["code"] == "UNAUTHENTICATED"


# ---- the small parts -------------------------------------------------------------------------------------------


def test_months_and_their_local_bounds() -> None:
    assert Month.parse("2026-10").plus(-12) == Month(2025, 10) and str(Month(2026, 1).plus(-1)) == "2025-12"
    assert Month(2024, 2).last_day == date(2024, 2, 29)
    start, end = Month(2026, 11).bounds(ZoneInfo(AUCKLAND))
    assert (start.astimezone(UTC), end.astimezone(UTC)) == (utc(2026, 10, 31, 11), utc(2026, 11, 30, 11))
    assert parse_day_or_month("2026-02", end=True) == date(2026, 2, 28)
    for bad in ("2026-00", "0000-01", "2026-1", "2026-W40-1"):
        with pytest.raises(ValueError, match="expected"):
            parse_day_or_month(bad, end=False)


def test_accept_header_negotiation() -> None:
    assert prefers_html("text/html") and prefers_html("text/*") and prefers_html("*/*;q=0.1, text/html")
    assert not prefers_html(None) and not prefers_html("*/*") and not prefers_html("application/json")
    assert not prefers_html("text/html;q=0, */*") and not prefers_html("text/html;q=0.4, application/json")


def test_axis_maximum_is_round() -> None:
    assert [nice_ceiling(v) for v in (0, 0.7, 3, 128.25, 4100, 9999)] == [1, 1, 5, 200, 5000, 10000]
