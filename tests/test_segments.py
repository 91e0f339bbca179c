"""The segments domain: `update_customer_segments` on a crafted data set, in a private database (the job scores
every customer there is). Expected scores are worked out by hand below and by an independent Python count; ties
included, a second run writes nothing, the history holds each change once, and the grid table drives the mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.asyncio import Redis

from db.queries.segments import SegmentGridError, update_segments
from salesdash.auth import OPERATOR
from salesdash.config import Settings
from tests.conftest import arq_burst
from tests.private_db import private_database, settings_for
from worker import client
from worker.jobs.segments import update_customer_segments

AS_OF = datetime.now(UTC)
TODAY = AS_OF.date()

# customer -> (days since the last purchase, purchases, total revenue) in the 365-day window. Eleven buyers: a
# customer's percent rank is (buyers with a strictly smaller value) / 10, so the score is 1 + that count // 2
# (capped at 5). Ties: c1 = c2 in everything (c2's last purchase is later on the same day), c4 = c5, c10 = c11, and
# five customers bought once.
BUYERS: dict[str, tuple[int, int, int]] = {
    "c1": (1, 6, 600),
    "c2": (1, 6, 600),
    "c3": (5, 4, 400),
    "c4": (10, 1, 50),
    "c5": (10, 1, 50),
    "c6": (30, 3, 300),
    "c7": (60, 1, 20),
    "c8": (100, 2, 80),
    "c9": (200, 5, 1000),
    "c10": (300, 1, 10),
    "c11": (300, 1, 10),
}
# Worked out by hand from the rule above. ntile(5) would split each run of ties (five F=1 buyers over F1 and F2).
EXPECTED: dict[str, tuple[int, int, int, str]] = {
    "c1": (5, 5, 5, "champions"),
    "c2": (5, 5, 5, "champions"),
    "c3": (5, 4, 4, "champions"),
    "c4": (4, 1, 2, "promising"),
    "c5": (4, 1, 2, "promising"),
    "c6": (3, 4, 4, "loyal"),
    "c7": (3, 1, 2, "about_to_sleep"),
    "c8": (2, 3, 3, "at_risk"),
    "c9": (2, 5, 5, "cant_lose_them"),
    "c10": (1, 1, 1, "hibernating"),
    "c11": (1, 1, 1, "hibernating"),
}
# No purchase in the window: no order at all, only cancelled/refunded/pending ones, or a purchase before the window.
PROSPECTS = ("p_none", "p_not_paid", "p_old")

# The R×F grid as the issue states it (R, F ranges) -> segment.
GRID = {
    "champions": ((5,), (4, 5)),
    "loyal": ((3, 4), (4, 5)),
    "potential_loyalists": ((4, 5), (2, 3)),
    "new": ((5,), (1,)),
    "promising": ((4,), (1,)),
    "need_attention": ((3,), (3,)),
    "about_to_sleep": ((3,), (1, 2)),
    "cant_lose_them": ((1, 2), (5,)),
    "at_risk": ((1, 2), (3, 4)),
    "hibernating": ((1, 2), (1, 2)),
}


def _at(days_ago: int, hour: int) -> datetime:
    return datetime.combine(TODAY - timedelta(days=days_ago), time(hour), tzinfo=UTC)


def _orders() -> list[tuple[str, str, Decimal, datetime]]:
    """(customer, status, amount, created_at): each buyer's purchases on consecutive days back from the last one,
    amounts splitting the revenue evenly; plus orders that must not count."""
    rows = []
    for name, (days_ago, count, revenue) in BUYERS.items():
        hour = 14 if name == "c2" else 10  # c2 buys later on the same day as c1: still the same recency
        for k in range(count):
            rows.append((name, "paid" if k % 2 else "delivered", Decimal(revenue) / count, _at(days_ago + k, hour)))
    rows += [
        ("c8", "cancelled", Decimal(5000), _at(1, 9)),  # would make c8 the most recent and biggest buyer
        ("c8", "refunded", Decimal(5000), _at(1, 9)),
        ("c8", "shipped", Decimal(0), AS_OF + timedelta(hours=1)),  # after as_of: outside the window
        ("p_not_paid", "cancelled", Decimal(100), _at(3, 10)),
        ("p_not_paid", "refunded", Decimal(100), _at(4, 10)),
        ("p_not_paid", "pending", Decimal(100), _at(5, 10)),
        ("p_old", "paid", Decimal(100), _at(400, 10)),
    ]
    return rows


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with private_database("salesdash_test_segments") as url:
        yield url


@pytest.fixture(scope="module")
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=3)
    assert pool is not None
    names = [*BUYERS, *PROSPECTS]
    ids = await pool.fetch(
        "INSERT INTO customers (email, name, country) SELECT n || '@example.com', n, 'NZ' FROM unnest($1::text[]) n "
        "RETURNING id, name",
        names,
    )
    by_name = {r["name"]: r["id"] for r in ids}
    await pool.executemany(
        "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, $2, $3, $4)",
        [(by_name[c], s, a, at) for c, s, a, at in _orders()],
    )
    yield pool
    await pool.close()


async def _customers(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT *, xmin::text::bigint AS row_version FROM customers")
    return {r["name"]: r for r in rows}


async def _run(pool: asyncpg.Pool, **kwargs: Any) -> Any:
    async with pool.acquire() as conn:
        return await update_segments(conn, as_of=AS_OF, window_days=365, timezone="UTC", **kwargs)


def _quintile(value: Any, values: list[Any]) -> int:
    """The documented rule, counted directly: 1 + floor(5 * share of the others strictly below), at most 5."""
    below = sum(1 for v in values if v < value)
    return min(5, 1 + (5 * below) // (len(values) - 1))


def _grid_segment(r: int, f: int) -> str:
    return next(name for name, (rs, fs) in GRID.items() if r in rs and f in fs)


def test_the_hand_worked_expectations_follow_the_rule_and_the_grid() -> None:
    """The test's own arithmetic: the hand-worked table agrees with a direct count and with the issue's grid."""
    last_days = {c: TODAY - timedelta(days=d) for c, (d, _, _) in BUYERS.items()}
    for name, (_, count, revenue) in BUYERS.items():
        r = _quintile(last_days[name], list(last_days.values()))
        f = _quintile(count, [v[1] for v in BUYERS.values()])
        m = _quintile(revenue, [v[2] for v in BUYERS.values()])
        assert (r, f, m, _grid_segment(r, f)) == EXPECTED[name], name
    assert sum(len(rs) * len(fs) for rs, fs in GRID.values()) == 25


async def test_segments_land_where_the_grid_says_ties_included(pool: asyncpg.Pool) -> None:
    run = await _run(pool)
    assert run is not None and run.scored == len(BUYERS)
    assert run.changed == run.history_rows == len(BUYERS) + len(PROSPECTS)  # every customer gets its first segment
    customers = await _customers(pool)
    for name, expected in EXPECTED.items():
        row = customers[name]
        assert (row["rfm_recency"], row["rfm_frequency"], row["rfm_monetary"], row["segment"]) == expected, name
        assert row["segment_updated_at"] == AS_OF
    for tied in (("c1", "c2"), ("c4", "c5"), ("c10", "c11"), ("c4", "c5", "c7", "c10", "c11")):
        assert len({customers[c]["rfm_frequency"] for c in tied}) == 1, tied
    for name in PROSPECTS:
        row = customers[name]
        assert row["segment"] == "prospect", name
        assert (row["rfm_recency"], row["rfm_frequency"], row["rfm_monetary"]) == (None, None, None)


async def test_a_second_run_writes_no_row(pool: asyncpg.Pool) -> None:
    before = await _customers(pool)
    history = await pool.fetchval("SELECT count(*) FROM customer_segment_history")
    run = await _run(pool)
    assert run is not None and (run.changed, run.history_rows) == (0, 0)
    after = await _customers(pool)
    assert {n: r["row_version"] for n, r in after.items()} == {n: r["row_version"] for n, r in before.items()}
    assert await pool.fetchval("SELECT count(*) FROM customer_segment_history") == history


async def test_the_history_records_each_change_once(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """SELECT c.name, h.from_segment, h.to_segment, h.recency, h.frequency, h.monetary, h.changed_at
             FROM customer_segment_history h JOIN customers c ON c.id = h.customer_id ORDER BY h.changed_at, c.name"""
    )
    assert sorted(r["name"] for r in rows) == sorted([*BUYERS, *PROSPECTS])  # once each, after two runs
    for row in rows:
        expected = EXPECTED.get(row["name"], (None, None, None, "prospect"))
        assert row["from_segment"] is None
        assert (row["recency"], row["frequency"], row["monetary"], row["to_segment"]) == expected
        assert row["changed_at"] == AS_OF


async def test_a_changed_grid_cell_changes_the_mapping(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE segment_grid SET segment = 'vip' WHERE recency = 5 AND frequency = 5")
    try:
        run = await _run(pool)
        assert run is not None and run.changed == run.history_rows == 2  # c1 and c2 (R5 F5); c3 is R5 F4
        customers = await _customers(pool)
        assert {n for n, r in customers.items() if r["segment"] == "vip"} == {"c1", "c2"}
        moves = await pool.fetch(
            """SELECT c.name, h.from_segment, h.to_segment FROM customer_segment_history h
                 JOIN customers c ON c.id = h.customer_id WHERE h.to_segment = 'vip' ORDER BY c.name"""
        )
        assert [tuple(m) for m in moves] == [("c1", "champions", "vip"), ("c2", "champions", "vip")]
    finally:
        await pool.execute("UPDATE segment_grid SET segment = 'champions' WHERE recency = 5 AND frequency = 5")
    run = await _run(pool)
    assert run is not None and run.changed == 2  # and back


async def test_a_grid_that_misses_a_cell_is_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="missing: R1F1"):
        await pool.execute("DELETE FROM segment_grid WHERE recency = 1 AND frequency = 1")
    with pytest.raises(asyncpg.CheckViolationError, match="cannot be truncated"):
        await pool.execute("TRUNCATE segment_grid")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("INSERT INTO segment_grid VALUES (1, 1, 'twice')")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE segment_grid SET frequency = 6 WHERE recency = 1 AND frequency = 1")
    # moving cells within one transaction is fine as long as it commits a whole grid
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM segment_grid WHERE recency = 1 AND frequency = 1")
        await conn.execute("INSERT INTO segment_grid VALUES (1, 1, 'hibernating')")
    # past the trigger (disabled by a superuser), the job refuses the grid itself, and writes nothing
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("ALTER TABLE segment_grid DISABLE TRIGGER segment_grid_complete")
            await conn.execute("DELETE FROM segment_grid WHERE recency IN (1, 2) AND frequency = 5")
            with pytest.raises(SegmentGridError, match="missing: R1F5, R2F5"):
                await update_segments(conn, as_of=AS_OF, window_days=365, timezone="UTC")
        finally:
            await tx.rollback()
    assert await pool.fetchval("SELECT count(*) FROM segment_grid") == 25


async def test_recency_ties_are_local_days(pool: asyncpg.Pool) -> None:
    """Three buyers (in a transaction rolled back): a at 10:00 and b at 14:00 UTC on one day, z ten days earlier.
    With three buyers the score is 1 + floor(5 * below / 2): in UTC a and b share a day (both 3, z 1); in
    Pacific/Pago_Pago (UTC-11) a's purchase falls on the day before b's, and b alone scores 5."""
    day = TODAY - timedelta(days=3)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("DELETE FROM orders")
            ids = {r["name"]: r["id"] for r in await conn.fetch("SELECT id, name FROM customers")}
            await conn.executemany(
                "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, 'paid', 10, $2)",
                [
                    (ids["c1"], datetime.combine(day, time(10), UTC)),
                    (ids["c2"], datetime.combine(day, time(14), UTC)),
                    (ids["c3"], datetime.combine(day - timedelta(days=10), time(12), UTC)),
                ],
            )
            scores = {}
            for zone in ("UTC", "Pacific/Pago_Pago"):
                await update_segments(conn, as_of=AS_OF, window_days=365, timezone=zone)
                rows = await conn.fetch("SELECT name, rfm_recency FROM customers WHERE name IN ('c1', 'c2', 'c3')")
                scores[zone] = {r["name"]: r["rfm_recency"] for r in rows}
            assert scores == {"UTC": {"c1": 3, "c2": 3, "c3": 1}, "Pacific/Pago_Pago": {"c1": 3, "c2": 5, "c3": 1}}
        finally:
            await tx.rollback()


# Random buyers for the property test: (days since the last purchase, purchases, cents per purchase), each drawn from
# a few values so that ties are common (a day before today: its noon is always past)
RANDOM_BUYER = st.tuples(st.sampled_from([1, 2, 3, 30, 200]), st.integers(1, 4), st.sampled_from([1, 250, 999, 5000]))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(buyers=st.lists(RANDOM_BUYER, min_size=1, max_size=14))
async def test_the_cuts_score_as_percent_rank_does(pool: asyncpg.Pool, buyers: list[tuple[int, int, int]]) -> None:
    """The statement's cut-based scores against the documented rule counted in Python, on random buyers (in a
    transaction rolled back): ties, a single buyer, every value equal."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("DELETE FROM orders")
            ids = [r["id"] for r in await conn.fetch("SELECT id FROM customers ORDER BY id")][: len(buyers)]
            await conn.executemany(
                "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, 'paid', $2, $3)",
                [
                    (cid, Decimal(cents) / 100, _at(days + k, 12))
                    for cid, (days, count, cents) in zip(ids, buyers, strict=False)
                    for k in range(count)
                ],
            )
            run = await update_segments(conn, as_of=AS_OF, window_days=365, timezone="UTC")
            assert run is not None and run.scored == len(buyers)
            rows = {r["id"]: r for r in await conn.fetch("SELECT * FROM customers WHERE id = ANY($1)", ids)}
        finally:
            await tx.rollback()
    measures = [(-days, count, count * cents) for days, count, cents in buyers]  # a later day is a higher recency
    for cid, (recency, frequency, monetary) in zip(ids, measures, strict=True):
        expected = [_score(value, [m[i] for m in measures]) for i, value in enumerate((recency, frequency, monetary))]
        row = rows[cid]
        assert [row["rfm_recency"], row["rfm_frequency"], row["rfm_monetary"]] == expected, (buyers, cid)


def _score(value: int, values: list[int]) -> int:
    return 1 if len(values) == 1 else _quintile(value, values)


async def test_the_task_runs_on_a_real_maintenance_worker(
    database: str, pool: asyncpg.Pool, clean_redis: Redis
) -> None:
    await pool.execute("UPDATE customers SET segment = NULL, rfm_recency = NULL WHERE name = 'c9'")
    job = await client.enqueue_task(clean_redis, OPERATOR, "update_customer_segments")
    run = arq_burst("maintenance", extra_env={"DATABASE_URL": database})
    assert run.returncode == 0, run.stdout + run.stderr
    status = await client.job_status(clean_redis, pool, job.task_id)
    assert status.status == "complete", status
    result = status.result
    assert result["changed"] == result["history_rows"] == 1 and result["scored"] == len(BUYERS)
    assert result["window_days"] == 365 and result["segments"]["champions"] == 3
    assert (await _customers(pool))["c9"]["segment"] == "cant_lose_them"


async def test_the_job_reports_skipped_while_another_run_holds_the_lock(database: str, pool: asyncpg.Pool) -> None:
    ctx = {"db": pool, "settings": settings_for(database)}
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext('salesdash:segments'))")
        result = await update_customer_segments(ctx)
    assert result["skipped"] is True and "lock" in result["reason"]
    assert (await update_customer_segments(ctx))["skipped"] is False


@pytest.mark.parametrize("value", ["0", "36501", "a year"])
def test_a_bad_window_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SALESDASH_RFM_WINDOW_DAYS", value)
    with pytest.raises(ValidationError, match="SALESDASH_RFM_WINDOW_DAYS"):
        Settings()
