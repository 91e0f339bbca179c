"""Customer lifetime values: the per-customer purchase summary (one scan of orders), the fitted model parameters
(`lifetime_value_models`), and the bulk write-back into `customers`.

Revenue is what paid, shipped and delivered orders bring; cancelled, refunded and pending ones count nothing. A
purchase is a local day (SALESDASH_TIMEZONE) with revenue: two orders on one day are one purchase of their sum, as
the models count them (lifetimes' `summary_data_from_transaction_data`). Money crosses into Python as integer cents,
so the historical value written back is exactly the sum of the orders.

Rows move in PostgreSQL's binary COPY format: every column is a fixed-width number and never NULL, so a million rows
are one numpy record array, read or written without a Python object per row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

HORIZON_DAYS = 365  # predicted_ltv_12m and expected_purchases_12m: the next 12 months
_REVENUE = "('paid', 'shipped', 'delivered')"
_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('salesdash:lifetime_values'))"

# The orders come in customer order from `orders_customer_idx`, which carries status and total_amount (migration
# 0011): index-only scans of the monthly partitions, merged, sorted only within each customer by day, aggregated twice
# as they stream by, without the sort of every revenue order (~4.6 M rows at 5,000,000 orders) whose merge and
# aggregation a parallel plan leaves to its leader alone. The summary splits the customers into _RANGES ranges of
# ids, each summarised whole by one process: one Gather above their Parallel Append (a high parallel_setup_cost
# keeps the planner from a Gather per range) runs them on the parallel workers and the leader, ~30 % faster than one
# process on an idle 2-core machine. More ranges than processes: older customers (lower ids) have more orders. No
# hash aggregation (a hash table of millions of (customer, day) groups spills to disk). Merge joins with the
# customers' primary key, the summary's and the write-back's (the staging rows are in id order), meet the customers
# in the table's order (~10% less CPU than hashing every customer). The commit need not wait for its WAL to reach
# the disk: a run lost in a crash is redone by the next one.
_TUNE = """SELECT set_config('jit', 'off', true), set_config('work_mem', '256MB', true),
       set_config('enable_hashagg', 'off', true), set_config('parallel_setup_cost', '100000', true),
       set_config('enable_hashjoin', 'off', true), set_config('synchronous_commit', 'off', true)"""
_RANGES = 8
_KEY = 10**13  # see _SUMMARY


def _range_summary(n: int) -> str:
    """Range n's customers with revenue ($4: the first customer id, $5: ids per range; the last range is open)."""
    upper = "" if n == _RANGES - 1 else f" AND o.customer_id < $4::int8 + {n + 1} * $5::int8"
    return f"""
    (SELECT customer_id, count(*) AS purchase_days, max(day) - min(day) AS recency, $2::date - min(day) AS age,
            sum(cents) AS revenue, min((day - date '2000-01-01') * {_KEY}::int8 + cents) AS first_key
       FROM (SELECT o.customer_id, (o.created_at AT TIME ZONE $1)::date AS day,
                    -- whole cents summed as float8 (exact below 2^53, far beyond the 10^13 checked): a by-value
                    -- running total per group, where numeric or int8 sums allocate a state for each of millions
                    sum((o.total_amount * 100)::int8::float8)::int8 AS cents
               FROM orders o
              WHERE o.status IN {_REVENUE} AND o.created_at < $3 AND o.customer_id >= $4::int8 + {n} * $5::int8{upper}
              GROUP BY 1, 2) AS days
      GROUP BY customer_id)"""


# $1: timezone, $2: the last local day observed, $3: the end of that day; $4, $5: the id ranges (_range_summary). One
# pass over the orders up to then. Per customer with revenue: the purchase days, the days from the first to the last
# of them and from the first to $2, all revenue and the first day's revenue, in cents. The first day's revenue rides
# on min() over a key of the day (days from 2000, negative before) times 10^13 plus the day's cents (under 10^13:
# purchase_summary checks it), so that the key's remainder modulo 10^13 is the first day's cents. Rows for every
# customer with revenue, and for those without whose stored values are not yet a zero revenue without scores. Each
# row also carries the customer's values as stored, in the write-back's form (-1 and NaN for NULL), so that only the
# rows that change are sent back.
_SUMMARY = f"""
SELECT c.id,
       coalesce(s.purchase_days, 0)::int4,
       coalesce(s.recency, 0)::int4,
       coalesce(s.age, 0)::int4,
       coalesce(s.revenue - (s.first_key % {_KEY} + {_KEY}) % {_KEY}, 0)::int8,
       coalesce(s.revenue, 0)::int8,
       coalesce((c.lifetime_value * 100)::int8, -1),
       coalesce(c.probability_alive, 'NaN'),
       coalesce(c.expected_purchases_12m, 'NaN'),
       coalesce((c.predicted_ltv_12m * 100)::int8, -1)
  FROM customers c
  LEFT JOIN ({" UNION ALL".join(_range_summary(n) for n in range(_RANGES))}) AS s ON s.customer_id = c.id
 WHERE s.customer_id IS NOT NULL OR c.lifetime_value IS DISTINCT FROM 0 OR c.probability_alive IS NOT NULL
    OR c.expected_purchases_12m IS NOT NULL OR c.predicted_ltv_12m IS NOT NULL"""
_ID_RANGES = "SELECT coalesce(min(id), 0), (coalesce(max(id) - min(id), 0) + $1) / $1 FROM customers"

_STAGING = """CREATE TEMP TABLE lifetime_values_staging (
    customer_id bigint, revenue_cents bigint, probability_alive float8, expected_purchases float8,
    predicted_cents bigint
) ON COMMIT DROP"""

# NaN and -1 stand for "no score" in the staging rows (binary COPY rows here have no NULLs).
_UPDATE = """
UPDATE customers c
   SET lifetime_value = n.lifetime_value, probability_alive = n.probability_alive,
       expected_purchases_12m = n.expected_purchases, predicted_ltv_12m = n.predicted_value, ltv_updated_at = now()
  FROM (SELECT customer_id, revenue_cents * 0.01 AS lifetime_value,  -- exact, and cheaper than dividing
               nullif(probability_alive, 'NaN') AS probability_alive,
               nullif(expected_purchases, 'NaN') AS expected_purchases,
               nullif(predicted_cents, -1) * 0.01 AS predicted_value
          FROM lifetime_values_staging) n
 WHERE c.id = n.customer_id
   AND (c.lifetime_value, c.probability_alive, c.expected_purchases_12m, c.predicted_ltv_12m)
       IS DISTINCT FROM (n.lifetime_value, n.probability_alive, n.expected_purchases, n.predicted_value)"""

_MODEL_COLUMNS = (
    "id, as_of, fitted_at, customers, repeat_customers, r, alpha, a, b, p, q, v, purchases_log_likelihood, "
    "spend_log_likelihood, job_id"
)
# The model in use: the one fitted last (a run for an earlier day, a replay, fits after newer days did).
_LATEST_MODEL = f"SELECT {_MODEL_COLUMNS} FROM lifetime_value_models ORDER BY fitted_at DESC, id DESC LIMIT 1"
# One model per day: a second run on the same day (a retry after a crash) replaces the first one's fit.
_SAVE_MODEL = f"""
INSERT INTO lifetime_value_models AS m (as_of, customers, repeat_customers, r, alpha, a, b, p, q, v,
                                        purchases_log_likelihood, spend_log_likelihood, job_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (as_of) DO UPDATE SET
    fitted_at = now(), customers = EXCLUDED.customers, repeat_customers = EXCLUDED.repeat_customers,
    r = EXCLUDED.r, alpha = EXCLUDED.alpha, a = EXCLUDED.a, b = EXCLUDED.b, p = EXCLUDED.p, q = EXCLUDED.q,
    v = EXCLUDED.v, purchases_log_likelihood = EXCLUDED.purchases_log_likelihood,
    spend_log_likelihood = EXCLUDED.spend_log_likelihood, job_id = EXCLUDED.job_id
RETURNING {_MODEL_COLUMNS}"""


class ModelParameters(BaseModel):
    """BG/NBD (r, α per day, a, b) and Gamma-Gamma (p, q, v) parameters."""

    r: float
    alpha: float
    a: float
    b: float
    p: float
    q: float
    v: float


class ModelFit(ModelParameters):
    """A converged fit, as saved."""

    as_of: date  # the last local day of the orders it was fitted on
    customers: int  # with a purchase: the BG/NBD fit
    repeat_customers: int  # with a repeat purchase of positive value: the Gamma-Gamma fit
    purchases_log_likelihood: float  # mean per customer
    spend_log_likelihood: float


class LifetimeValueModel(ModelFit):
    """A saved fit: what `GET /customers/lifetime-value-model` shows."""

    id: int
    fitted_at: datetime
    job_id: str | None


@dataclass(frozen=True)
class PurchaseSummary:
    """Per customer, by id: purchase days up to the observed day (0: none), recency and age in days (0 without a
    purchase), the revenue of the purchase days after the first and all revenue, in cents."""

    customer_id: Int64Array
    purchase_days: Int64Array
    recency: Int64Array
    age: Int64Array
    repeat_cents: Int64Array
    revenue_cents: Int64Array
    stored: CustomerValues | None = None  # the same customers' values as stored when summarised


@dataclass(frozen=True)
class CustomerValues:
    """What the job writes back, per customer: NaN (floats) or -1 (cents) where there is no score."""

    customer_id: Int64Array
    revenue_cents: Int64Array
    probability_alive: FloatArray
    expected_purchases: FloatArray
    predicted_cents: Int64Array

    def changed_from(self, stored: CustomerValues) -> CustomerValues:
        """The rows whose values differ from `stored` (the same customers, in the same order), compared as the
        write-back's UPDATE compares them (IS DISTINCT FROM: two missing scores are equal)."""
        if not np.array_equal(self.customer_id, stored.customer_id):
            raise ValueError("stored values are not of the same customers in the same order")
        changed = (self.revenue_cents != stored.revenue_cents) | (self.predicted_cents != stored.predicted_cents)
        for name in ("probability_alive", "expected_purchases"):
            new, old = getattr(self, name), getattr(stored, name)
            changed |= ~((new == old) | (np.isnan(new) & np.isnan(old)))
        return CustomerValues(**{name: getattr(self, name)[changed] for name in CustomerValues.__dataclass_fields__})


async def try_lock(conn: asyncpg.Connection) -> bool:
    """The job's lock for the rest of the transaction; False when another run holds it."""
    return bool(await conn.fetchval(_LOCK))


async def tune(conn: asyncpg.Connection) -> None:
    """Session settings for the summary and the write-back, for the rest of the transaction."""
    await conn.execute(_TUNE)


async def purchase_summary(conn: asyncpg.Connection, timezone: str, as_of: date) -> PurchaseSummary:
    """The summary of the customers' purchases and revenue up to the end of the local day `as_of` in `timezone`:
    every customer with revenue, and every other one whose stored values are not yet zero revenue and no scores.
    One scan of orders, streamed as binary COPY."""
    layout = _layout(
        [
            ("customer_id", ">i8"),
            ("purchase_days", ">i4"),
            ("recency", ">i4"),
            ("age", ">i4"),
            ("repeat_cents", ">i8"),
            ("revenue_cents", ">i8"),
            ("stored_revenue_cents", ">i8"),
            ("stored_probability_alive", ">f8"),
            ("stored_expected_purchases", ">f8"),
            ("stored_predicted_cents", ">i8"),
        ]
    )
    raw = bytearray()

    async def collect(chunk: bytes) -> None:
        raw.extend(chunk)

    # the end of the day as a value: asyncpg writes COPY's parameters into the statement, and the planner then
    # knows that the bound keeps every row (as an expression, it guesses an index scan pays)
    end = await conn.fetchval("SELECT ($1::date + 1)::timestamp AT TIME ZONE $2", as_of, timezone)
    first, width = await conn.fetchrow(_ID_RANGES, _RANGES)
    await conn.copy_from_query(_SUMMARY, timezone, as_of, end, first, width, output=collect, format="binary")
    rows = _decode(raw, layout)
    order = np.argsort(rows["customer_id"], kind="stable")  # by customer: the same data, the same arrays
    columns = {name: rows[name][order].astype(np.int64) for name in PurchaseSummary.__dataclass_fields__
               if name != "stored"}  # fmt: skip
    stored = CustomerValues(
        columns["customer_id"],
        rows["stored_revenue_cents"][order].astype(np.int64),
        rows["stored_probability_alive"][order].astype(np.float64),
        rows["stored_expected_purchases"][order].astype(np.float64),
        rows["stored_predicted_cents"][order].astype(np.int64),
    )
    if len(rows) and int(columns["revenue_cents"].max()) >= _KEY:
        customer = int(columns["customer_id"][np.argmax(columns["revenue_cents"])])
        raise ValueError(f"customer {customer} has revenue of 10^11 or more, beyond what the summary can carry")
    return PurchaseSummary(**columns, stored=stored)


async def write_values(conn: asyncpg.Connection, values: CustomerValues) -> int:
    """Write every customer's values in one UPDATE of the rows that change, from a staging table filled by binary
    COPY. Returns the rows updated. Run it inside the caller's transaction (the staging table goes at commit)."""
    layout = _layout(
        [
            ("customer_id", ">i8"),
            ("revenue_cents", ">i8"),
            ("probability_alive", ">f8"),
            ("expected_purchases", ">f8"),
            ("predicted_cents", ">i8"),
        ]
    )
    rows = _encode(layout, {name: getattr(values, name) for name in CustomerValues.__dataclass_fields__})
    await conn.execute(_STAGING)
    await conn.copy_to_table("lifetime_values_staging", source=_pieces(rows), format="binary")
    status = await conn.execute(_UPDATE)
    return int(status.rsplit(" ", 1)[-1])


async def latest_model(conn: asyncpg.Connection | asyncpg.Pool) -> LifetimeValueModel | None:
    row = await conn.fetchrow(_LATEST_MODEL)
    return None if row is None else LifetimeValueModel.model_validate(dict(row))


async def save_model(conn: asyncpg.Connection, fit: ModelFit, job_id: str | None) -> LifetimeValueModel:
    row = await conn.fetchrow(
        _SAVE_MODEL,
        fit.as_of,
        fit.customers,
        fit.repeat_customers,
        fit.r,
        fit.alpha,
        fit.a,
        fit.b,
        fit.p,
        fit.q,
        fit.v,
        fit.purchases_log_likelihood,
        fit.spend_log_likelihood,
        job_id,
    )
    return LifetimeValueModel.model_validate(dict(row))


# --------------------------------------------------------------------------------------------------
# Binary COPY with fixed-width, non-NULL columns
# --------------------------------------------------------------------------------------------------

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = _SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # no flags, no header extension
_TRAILER = b"\xff\xff"
_PIECE = 1 << 20  # bytes per CopyData message


def _layout(columns: Sequence[tuple[str, str]]) -> np.dtype[np.void]:
    """One COPY row: the field count, then each field's length and big-endian value."""
    fields: list[tuple[str, str]] = [("fields", ">i2")]
    for name, kind in columns:
        fields += [(f"{name}_length", ">i4"), (name, kind)]
    return np.dtype(fields)


def _decode(raw: bytes | bytearray, layout: np.dtype[np.void]) -> npt.NDArray[np.void]:
    if not raw.startswith(_SIGNATURE) or not raw.endswith(_TRAILER):
        raise ValueError("not a PostgreSQL binary COPY stream")
    start = 19 + int.from_bytes(raw[15:19], "big")  # after the flags and the header extension
    body = memoryview(raw)[start : len(raw) - len(_TRAILER)]
    if len(body) % layout.itemsize:
        raise ValueError(f"binary COPY body of {len(body)} bytes is not made of {layout.itemsize}-byte rows")
    rows = np.frombuffer(body, dtype=layout)
    names = [name for name in layout.names or () if name != "fields" and not name.endswith("_length")]
    if len(rows) and not (
        np.all(rows["fields"] == len(names))
        and all(np.all(rows[f"{name}_length"] == layout[name].itemsize) for name in names)
    ):
        raise ValueError("binary COPY rows are not the expected fixed-width, non-NULL columns")
    return rows


def _encode(layout: np.dtype[np.void], columns: dict[str, npt.NDArray[np.generic]]) -> npt.NDArray[np.void]:
    """The COPY rows of the columns, one record each (header and trailer are added by `_pieces`)."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    rows = np.empty(lengths.pop() if lengths else 0, dtype=layout)
    rows["fields"] = len(columns)
    for name, values in columns.items():
        rows[f"{name}_length"] = layout[name].itemsize
        rows[name] = values
    return rows


async def _pieces(rows: npt.NDArray[np.void]) -> AsyncIterator[bytes | memoryview]:
    """A COPY stream of the rows, straight from their memory (no copy of the whole body)."""
    view = memoryview(rows.view(np.uint8).reshape(-1).data)
    yield _HEADER
    for start in range(0, len(view), _PIECE):
        yield view[start : start + _PIECE]
    yield _TRAILER
