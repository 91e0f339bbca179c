"""RFM segments: each customer's recency, frequency and monetary scores (1-5) over a window of days, mapped to a
named segment by the R×F grid in `segment_grid` (migration 0005); `prospect` for a customer with no purchase in the
window. One statement scores every customer, writes only the customers whose segment or scores changed, and
appends each of those changes to `customer_segment_history`.

Purchases are orders with status paid, shipped or delivered (revenue, as everywhere in the project): R, F and M all
read the same orders, so a customer whose only orders in the window were cancelled, refunded or pending is a
prospect.

- R orders customers by the local day (SALESDASH_TIMEZONE) of their last purchase: the same day is the same
  recency, a later day scores higher.
- F orders them by the number of purchases, M by the purchases' total amount.

Scores are quintiles of the customer's percent rank, `least(5, 1 + floor(5 * percent_rank()))`: percent_rank is
the share of the other scored customers with a strictly smaller value, so EQUAL VALUES GET EQUAL SCORES (all peers
share a rank). `ntile(5)` would not: it cuts the ordered rows into five equal runs and splits a run of ties between
two scores by whatever order the sort left them in. The price of keeping ties together is uneven bins: when 60% of
customers bought once, they all score F1 and the next value scores F4. The lowest value always scores 1.

The statement gets those scores without ranking the buyers (three window sorts, each carrying every buyer's row):
with n buyers and b(v) of them below a value v, the score exceeds k exactly when 5·b(v) ≥ k(n - 1), that is when
b(v) ≥ c_k = ⌈k(n - 1)/5⌉, that is when v is greater than the c_k-th smallest value. So each measure's values are
sorted once, bare, its four cuts read off at positions c_1..c_4, and a score is 1 plus the number of cuts the value
exceeds (a single buyer has no cut and scores 1, as percent_rank gives it 0). tests/test_segments.py compares the
two on random data, ties and single buyers included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

REVENUE_STATUSES = ("paid", "shipped", "delivered")
PROSPECT = "prospect"


class SegmentGridError(ValueError):
    """`segment_grid` does not cover every (recency, frequency) cell: the job refuses to segment with it."""


@dataclass(frozen=True)
class SegmentRun:
    scored: int  # customers with at least one purchase in the window
    changed: int  # customers whose segment or scores were written
    history_rows: int  # rows appended to customer_segment_history (one per changed customer)


def _score(value: str, cut: str) -> str:
    """The 1-5 score of `value`: 1 plus how many of its measure's four cuts it exceeds (`cuts` columns `<cut>1` to
    `<cut>4`, e.g. r1..r4). A missing cut (a single buyer) is exceeded by nothing."""
    ladder = " ".join(f"WHEN {value} > c.{cut}{k} THEN {k + 1}" for k in range(4, 0, -1))
    return f"(CASE {ladder} ELSE 1 END)::smallint"


# $1 as_of (timestamptz): the window is [as_of - $2 days, as_of); $3 the timezone recency days are read in.
_UPDATE_SEGMENTS = f"""
WITH purchases AS (
    SELECT o.customer_id,
           (max(o.created_at) AT TIME ZONE $3)::date AS last_day,
           count(*) AS orders,
           -- whole cents order buyers as the amounts do; summed as float8 (exact below 2^53 cents): a by-value
           -- running total, where int8's sum allocates a 128-bit state for each buyer
           sum((o.total_amount * 100)::int8::float8) AS revenue_cents
      FROM orders o
     WHERE o.status = ANY ($4::text[])
       AND o.created_at >= $1::timestamptz - make_interval(days => $2) AND o.created_at < $1::timestamptz
     GROUP BY o.customer_id),
-- Each measure's values sorted once, bare (no row carried along), and its four cuts read off at their positions
-- (see the module docstring)
sorted AS (
    SELECT count(*) AS n,
           array_agg(last_day ORDER BY last_day) AS days,
           array_agg(orders ORDER BY orders) AS counts,
           array_agg(revenue_cents ORDER BY revenue_cents) AS amounts
      FROM purchases),
cuts AS (
    SELECT days[c1] AS r1, days[c2] AS r2, days[c3] AS r3, days[c4] AS r4,
           counts[c1] AS f1, counts[c2] AS f2, counts[c3] AS f3, counts[c4] AS f4,
           amounts[c1] AS m1, amounts[c2] AS m2, amounts[c3] AS m3, amounts[c4] AS m4
      FROM sorted CROSS JOIN LATERAL
           (SELECT (n - 1 + 4) / 5 AS c1, (2 * (n - 1) + 4) / 5 AS c2, (3 * (n - 1) + 4) / 5 AS c3,
                   (4 * (n - 1) + 4) / 5 AS c4) AS positions),
scored AS (
    SELECT p.customer_id,
           {_score("p.last_day", "r")} AS r,
           {_score("p.orders", "f")} AS f,
           {_score("p.revenue_cents", "m")} AS m
      FROM purchases p CROSS JOIN cuts c),
-- The grid as one array of its 25 cells, R-major (NULL for a missing cell, as a join would find it): a lookup per
-- buyer instead of a join, which with hash joins off (below) would sort every buyer by cell.
grid AS (
    SELECT array_agg(g.segment ORDER BY r, f) AS cells
      FROM generate_series(1, 5) AS r CROSS JOIN generate_series(1, 5) AS f
      LEFT JOIN segment_grid g ON g.recency = r AND g.frequency = f),
-- Materialized: each buyer's segment is looked up once, where an inlined CTE would repeat the lookup wherever the
-- statement reads it
segmented AS MATERIALIZED (
    SELECT s.customer_id, coalesce((SELECT cells FROM grid)[(s.r - 1) * 5 + s.f], '{PROSPECT}') AS segment,
           s.r, s.f, s.m
      FROM scored s),
target AS (
    SELECT c.id, c.segment AS old_segment, coalesce(s.segment, '{PROSPECT}') AS segment, s.r, s.f, s.m
      FROM customers c
      LEFT JOIN segmented s ON s.customer_id = c.id
     WHERE (c.segment, c.rfm_recency, c.rfm_frequency, c.rfm_monetary)
           IS DISTINCT FROM (coalesce(s.segment, '{PROSPECT}'), s.r, s.f, s.m)),
changed AS (
    UPDATE customers c
       SET segment = t.segment, rfm_recency = t.r, rfm_frequency = t.f, rfm_monetary = t.m,
           segment_updated_at = $1::timestamptz
      FROM target t
     WHERE c.id = t.id
    RETURNING c.id, t.old_segment, t.segment, t.r, t.f, t.m),
logged AS (
    INSERT INTO customer_segment_history
           (customer_id, from_segment, to_segment, recency, frequency, monetary, changed_at)
    SELECT id, old_segment, segment, r, f, m, $1::timestamptz FROM changed
    RETURNING 1)
SELECT (SELECT count(*) FROM purchases) AS scored, (SELECT count(*) FROM changed) AS changed,
       (SELECT count(*) FROM logged) AS history_rows"""

# The window's orders come in customer order from `orders_customer_idx`, which carries status and total_amount
# (migration 0011): index-only scans merged across the months, grouped as they stream by, where hashing them (the
# planner's choice) builds a table of every buyer. Each measure's values sorted in memory; no JIT: compiling
# the plan costs more than it saves here. No hash joins: with them the UPDATE meets the customers in the order of the
# scored buyers, at random, and on a table larger than shared_buffers each row then reads and dirties a page of its
# own (46 s at 1,000,000 customers on the first run). Merge joins over the primary key visit them in id order, which
# is the table's order (17 s). The commit need not wait for its WAL to reach the disk: a run lost in a crash is
# redone by the next one.
_TUNE = """SELECT set_config('work_mem', '128MB', true), set_config('jit', 'off', true),
       set_config('enable_hashjoin', 'off', true), set_config('enable_hashagg', 'off', true),
       set_config('synchronous_commit', 'off', true)"""
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('salesdash:segments'))"
_SEGMENT_COUNTS = "SELECT segment, count(*) AS customers FROM customers GROUP BY segment ORDER BY customers DESC"


async def missing_grid_cells(conn: asyncpg.Connection) -> str | None:
    """The (recency, frequency) cells `segment_grid` lacks, as text (`R1F1, R1F2`), or None when it is complete."""
    missing: str | None = await conn.fetchval("SELECT segment_grid_missing_cells()")
    return missing


async def update_segments(
    conn: asyncpg.Connection, *, as_of: datetime, window_days: int, timezone: str
) -> SegmentRun | None:
    """Score and segment every customer in one transaction; None when another run holds the lock. Raises
    SegmentGridError when the grid misses a cell (the migration's constraint trigger normally prevents that)."""
    async with conn.transaction():
        if not await conn.fetchval(_TRY_LOCK):
            return None
        missing = await missing_grid_cells(conn)
        if missing is not None:
            raise SegmentGridError(f"segment_grid must cover all 25 (recency, frequency) cells; missing: {missing}")
        await conn.execute(_TUNE)
        row = await conn.fetchrow(_UPDATE_SEGMENTS, as_of, window_days, timezone, list(REVENUE_STATUSES))
    return SegmentRun(row["scored"], row["changed"], row["history_rows"])


async def segment_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Customers per segment (`unsegmented` for those never segmented), largest first."""
    rows = await conn.fetch(_SEGMENT_COUNTS)
    return {row["segment"] or "unsegmented": row["customers"] for row in rows}
