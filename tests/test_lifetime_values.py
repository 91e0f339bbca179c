"""The lifetime_values domain: the job's own SQL summary and fit reproduce the published BG/NBD and Gamma-Gamma
estimates on CDNOW; the historical value is exactly the revenue in orders; a more recent buyer is more likely alive;
a fit that does not converge keeps the newest saved model; runs are idempotent, serialised, and reachable through a
real worker and over REST.

CDNOW is test-only data: the CDNOW_sample transactions (2,357 customers, Fader, Hardie & Lee 2005) are read from
the `lifetimes` wheel, downloaded here with pip (the package's dependencies are never installed)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import numpy as np
import pytest
from redis.asyncio import Redis
from scipy.optimize import approx_fprime

from db.queries import lifetime_values as queries
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst
from worker import client
from worker import lifetime_model as lm
from worker.jobs.lifetime_values import fit_models, model_summary, update_customer_lifetime_values
from worker.registry import TaskArgumentError

CDNOW_END = date(1997, 9, 30)  # the 39 weeks from 1997-01-01: T of a first purchase on 1997-01-01 is 38.86 weeks
CDNOW_IDS = 9_000_000_000  # CDNOW customer k is customer CDNOW_IDS + k
CDNOW_ZONE = "America/New_York"  # purchases at 23:30 local time: the next day in UTC, their own day locally
# Fader, Hardie & Lee (2005), "Counting Your Customers the Easy Way", table 1; α in weeks
PUBLISHED_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
PUBLISHED_LOG_LIKELIHOOD = -9582.4  # the same fit's log-likelihood, weeks
# Fader, Hardie & Lee (2005), "RFM and CLV: Using Iso-Value Curves", the Gamma-Gamma fit to the same sample
PUBLISHED_GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "v": 15.44}
REVENUE = ("paid", "shipped", "delivered")
CRAFTED = 8_000_000_000  # ids of the customers the tests below make by hand


@pytest.fixture(scope="module")
def cdnow_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    target = tmp_path_factory.mktemp("lifetimes")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "lifetimes==0.11.3", "-d", str(target)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert download.returncode == 0, f"could not download the lifetimes wheel: {download.stderr}"
    (wheel,) = target.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        yield archive


def cdnow_transactions(wheel: zipfile.ZipFile) -> list[tuple[int, date, Decimal]]:
    """(sample customer 1..2357, day, amount) from CDNOW_sample.txt: original id, sample id, yyyymmdd, units, $."""
    rows = []
    for line in wheel.read("lifetimes/datasets/CDNOW_sample.txt").decode().splitlines():
        _, customer, day, _, amount = line.split()
        rows.append((int(customer), datetime.strptime(day, "%Y%m%d").date(), Decimal(amount)))
    return rows


def published_summary(wheel: zipfile.ZipFile) -> dict[int, dict[str, float]]:
    """The paper's calibration summary shipped beside the data: x, t_x and T in weeks (2 decimals), zbar in $."""
    text = wheel.read("lifetimes/datasets/cdnow_customers_summary_with_transactions.csv").decode()
    return {int(r["ID"]): {k: float(v) for k, v in r.items() if k != "ID"} for r in csv.DictReader(io.StringIO(text))}


async def load_cdnow(conn: asyncpg.Connection, transactions: list[tuple[int, date, Decimal]]) -> None:
    """CDNOW as the project's customers and paid orders (in the caller's transaction, which rolls it back)."""
    await conn.execute("SELECT ensure_order_partitions('1997-01-01', '1998-07-31')")
    customers = sorted({c for c, _, _ in transactions})
    await conn.copy_records_to_table(
        "customers",
        records=[(CDNOW_IDS + c, f"cdnow-{c}@example.com", f"CDNOW {c}", "US") for c in customers],
        columns=["id", "email", "name", "country"],
    )
    zone = ZoneInfo(CDNOW_ZONE)
    await conn.copy_records_to_table(
        "orders",
        records=[
            (CDNOW_IDS + c, "paid", amount, datetime(d.year, d.month, d.day, 23, 30, tzinfo=zone))
            for c, d, amount in transactions
        ],
        columns=["customer_id", "status", "total_amount", "created_at"],
    )


async def test_cdnow_summary_and_fit_reproduce_the_published_estimates(db: asyncpg.Pool, cdnow_wheel: Any) -> None:
    transactions = cdnow_transactions(cdnow_wheel)
    assert len(transactions) == 6919 and len({c for c, _, _ in transactions}) == 2357
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await load_cdnow(conn, transactions)
            await queries.tune(conn)
            summary = await queries.purchase_summary(conn, CDNOW_ZONE, CDNOW_END)
        finally:
            await transaction.rollback()
    ours = np.flatnonzero(summary.customer_id > CDNOW_IDS)
    assert len(ours) == 2357
    inputs = model_summary(_rows(summary, ours))

    # the summary, customer by customer, against the paper's (weeks to 2 decimals)
    published = published_summary(cdnow_wheel)
    ids = summary.customer_id[ours] - CDNOW_IDS
    for k, (customer, x, t_x, big_t, m) in enumerate(
        zip(ids, inputs.frequency, inputs.recency, inputs.age, inputs.repeat_mean, strict=True)
    ):
        expected = published[int(customer)]
        assert (x, round(t_x / 7, 2), round(big_t / 7, 2)) == (expected["x"], expected["t_x"], expected["T"]), k
        assert m == pytest.approx(expected["zbar"], abs=0.005 + 1e-9), k  # published to 2 decimals

    fit, report = fit_models(inputs, summary.customer_id[ours], CDNOW_END, max_iterations=500)
    assert report.converged and fit is not None, report
    estimates = {"r": fit.r, "alpha": fit.alpha / 7, "a": fit.a, "b": fit.b}  # α per day → per week
    for name, value in PUBLISHED_BGNBD.items():
        assert estimates[name] == pytest.approx(value, rel=0.01), (name, estimates)
    # the log-likelihood in weeks: scaling time by 7 adds x·ln 7 per customer
    weekly = (fit.purchases_log_likelihood + float(np.mean(inputs.frequency)) * np.log(7)) * 2357
    assert weekly == pytest.approx(PUBLISHED_LOG_LIKELIHOOD, abs=1.0)
    for name, value in PUBLISHED_GAMMA_GAMMA.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.01), (name, fit)
    assert fit.customers == 2357 and fit.repeat_customers == int(np.count_nonzero(inputs.frequency))


def _rows(summary: queries.PurchaseSummary, index: np.ndarray) -> queries.PurchaseSummary:
    fields = [name for name in summary.__dataclass_fields__ if name != "stored"]
    return queries.PurchaseSummary(**{name: getattr(summary, name)[index] for name in fields})


def test_likelihood_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 8, 400).astype(float)
    age = rng.integers(30, 400, 400).astype(float)
    recency = np.where(x > 0, np.floor(age * rng.random(400)), 0.0)
    summary = lm.Summary(x, recency, age, np.where(x > 0, rng.gamma(3.0, 20.0, 400), 0.0))
    purchases = lm._purchase_data(summary, 1 / 400)
    point = np.log([0.4, 0.2, 0.9, 2.5])
    numeric = approx_fprime(point, lambda p: lm._bgnbd_negative_ll(p, purchases)[0], 1e-7)
    assert np.allclose(lm._bgnbd_negative_ll(point, purchases)[1], numeric, atol=1e-5)
    used = x > 0
    distinct, index = np.unique(x[used], return_inverse=True)
    m = summary.repeat_mean[used] / 60
    spend = lm._SpendData(x[used], m, np.log(m), np.log(x[used]), distinct, index.reshape(-1))
    point = np.log([5.0, 4.0, 2.0])
    numeric = approx_fprime(point, lambda p: lm._gamma_gamma_negative_ll(p, spend)[0], 1e-7)
    assert np.allclose(lm._gamma_gamma_negative_ll(point, spend)[1], numeric, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The job on the suite's database
# --------------------------------------------------------------------------------------------------

# The demo data and the crafted orders are placed relative to a fixed instant, and every run is as of its day, unless a
# test is about the default day: the seed follows the calendar (seasons, weekdays) and the purchase days depend on
# the hour (an order "200 days and an hour ago" is 201 local days back between 00:00 and 01:00), so data made
# relative to the wall clock gave fits that differed by the hour and the day (a 200-customer sample's Gamma-Gamma fit
# ran off to a boundary on some of them)
NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)
AS_OF = NOW.date()


@pytest.fixture(scope="module")
async def seeded(db: asyncpg.Pool) -> None:
    """Demo data to fit on, plus hand-made customers (ids from CRAFTED):
    +1, +2: three purchase days, the first 200 days ago; +1 last bought 150 days ago, +2 ten days ago;
    +3: two paid orders on one day, a cancelled, a refunded and a pending one; +4: no order at all;
    and an order of a customer that does not exist."""
    from db.seed import seed

    async with db.acquire() as conn:
        await seed(conn, customers=400, products=30, orders=4_000, months=12, seed=11, progress=False, now=NOW)
        await conn.executemany(
            "INSERT INTO customers (id, email, name, country) VALUES ($1, $2, 'Crafted', 'DE')",
            [(CRAFTED + k, f"crafted-{k}@example.com") for k in range(1, 5)],
        )
        ago = [(1, 200, "paid"), (1, 170, "shipped"), (1, 150, "delivered"), (2, 200, "paid"), (2, 100, "paid")]
        ago += [(2, 10, "paid"), (3, 40, "paid"), (3, 40, "paid"), (3, 30, "cancelled"), (3, 20, "refunded")]
        ago += [(3, 5, "pending"), (99, 3, "paid")]
        await conn.executemany(
            "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, $2, 40.25, $3)",
            [(CRAFTED + k, status, NOW - timedelta(days=days, hours=1)) for k, days, status in ago],
        )


def job_ctx(db: asyncpg.Pool, **settings: Any) -> dict[str, Any]:
    return {"db": db, "settings": get_settings().model_copy(update=settings)}


async def crafted(db: asyncpg.Pool) -> dict[int, asyncpg.Record]:
    rows = await db.fetch(
        """SELECT id - $1 AS k, lifetime_value, probability_alive, expected_purchases_12m, predicted_ltv_12m
             FROM customers WHERE id > $1 AND id < $1 + 100""",
        CRAFTED,
    )
    return {r["k"]: r for r in rows}


async def test_historical_value_is_the_revenue_in_orders(db: asyncpg.Pool, seeded: None) -> None:
    result = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert not result["skipped"] and result["fit"]["converged"], result
    mismatched = await db.fetch(
        f"""SELECT c.id, c.lifetime_value, coalesce(o.revenue, 0) AS revenue
              FROM customers c
              LEFT JOIN (SELECT customer_id, sum(total_amount) AS revenue FROM orders
                          WHERE status IN {REVENUE} GROUP BY 1) o ON o.customer_id = c.id
             WHERE c.lifetime_value IS DISTINCT FROM coalesce(o.revenue, 0)"""
    )
    assert mismatched == []
    rows = await crafted(db)
    assert rows[3]["lifetime_value"] == Decimal("80.50")  # two paid orders; cancelled, refunded, pending: nothing
    assert rows[4]["lifetime_value"] == 0 and rows[4]["predicted_ltv_12m"] is None  # no purchase, no prediction
    assert rows[1]["predicted_ltv_12m"] > 0 and 0 < rows[1]["probability_alive"] < 1
    again = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert again["updated"] == 0 and again["model"]["id"] == result["model"]["id"]  # same day: same fit, same values


def test_the_fit_sample_is_the_same_customers_whatever_the_row_order() -> None:
    rng = np.random.default_rng(5)
    ids = np.arange(1, 1001, dtype=np.int64) * 7
    x = rng.integers(0, 5, 1000).astype(float)
    summary = lm.Summary(x, x * 3, x * 3 + 20, x * 10)
    chosen = lm.sample(summary, 100, ids)
    shuffled = rng.permutation(1000)
    again = lm.sample(
        lm.Summary(x[shuffled], x[shuffled] * 3, x[shuffled] * 3 + 20, x[shuffled] * 10), 100, ids[shuffled]
    )
    assert len(chosen.frequency) == 100
    assert sorted(chosen.recency) == sorted(again.recency) and sorted(chosen.age) == sorted(again.age)
    assert lm.sample(summary, 1000, ids) is summary


async def test_a_second_run_on_the_same_data_writes_nothing_even_when_fitting_on_a_sample(
    db: asyncpg.Pool, seeded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.jobs.lifetime_values as job

    monkeypatch.setattr(job, "FIT_SAMPLE", 200)
    first = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert first["fit"]["converged"], first["fit"]
    assert first["model"]["customers"] == 200 < first["purchasers"]
    again = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert again["updated"] == 0 and again["model"] == {**first["model"], "fitted_at": again["model"]["fitted_at"]}


async def test_a_more_recent_buyer_is_more_likely_alive(db: asyncpg.Pool, seeded: None) -> None:
    await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    rows = await crafted(db)
    # +1 and +2: three purchase days each, first 200 days ago, same spend; +2 bought last 10 days ago, +1 150 days ago
    assert rows[2]["probability_alive"] > rows[1]["probability_alive"]
    assert rows[2]["expected_purchases_12m"] > rows[1]["expected_purchases_12m"]
    assert rows[2]["predicted_ltv_12m"] > rows[1]["predicted_ltv_12m"]
    model = await queries.latest_model(db)
    assert model is not None
    params = lm.PurchaseParams(model.r, model.alpha, model.a, model.b)
    x, age = np.full(50, 3.0), np.full(50, 200.0)
    alive = lm.probability_alive(params, lm.Summary(x, np.arange(150.0, 200.0), age, np.full(50, 40.25)))
    assert np.all(np.diff(alive) > 0)  # every day later the last purchase, more likely alive


async def test_a_fit_that_does_not_converge_keeps_the_newest_model(db: asyncpg.Pool, seeded: None) -> None:
    await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    await db.execute("UPDATE lifetime_value_models SET as_of = as_of - 1")  # today's fit becomes yesterday's
    before = await queries.latest_model(db)
    assert before is not None
    await db.execute(
        "UPDATE customers SET probability_alive = NULL, predicted_ltv_12m = NULL WHERE id = $1", CRAFTED + 1
    )
    result = await update_customer_lifetime_values(job_ctx(db, ltv_fit_max_iterations=1), as_of=AS_OF)
    assert result["fit"]["converged"] is False and "did not converge" in result["fit"]["message"]
    assert result["model_kept"] is True and result["model"]["id"] == before.id
    after = await queries.latest_model(db)
    assert after == before  # no new fit saved, yesterday's untouched
    rows = await crafted(db)
    params = lm.PurchaseParams(before.r, before.alpha, before.a, before.b)
    expected = lm.probability_alive(
        params, lm.Summary(np.array([2.0]), np.array([50.0]), np.array([200.0]), np.zeros(1))
    )
    assert rows[1]["probability_alive"] == pytest.approx(float(expected[0]))  # scored with yesterday's parameters


async def test_without_any_model_a_failed_fit_writes_historical_values_only(db: asyncpg.Pool, seeded: None) -> None:
    await db.execute("DELETE FROM lifetime_value_models")
    await db.execute("UPDATE customers SET lifetime_value = NULL WHERE id = $1", CRAFTED + 3)
    result = await update_customer_lifetime_values(job_ctx(db, ltv_fit_max_iterations=1), as_of=AS_OF)
    assert result["model"] is None and result["model_kept"] is False and not result["fit"]["converged"]
    assert await db.fetchval("SELECT count(*) FROM customers WHERE predicted_ltv_12m IS NOT NULL") == 0
    assert (await crafted(db))[3]["lifetime_value"] == Decimal("80.50")
    again = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert again["fit"]["converged"]  # a model again, for the rest


async def test_a_second_run_at_the_same_time_skips(db: asyncpg.Pool, seeded: None) -> None:
    async with db.acquire() as conn, conn.transaction():
        assert await queries.try_lock(conn)
        result = await update_customer_lifetime_values(job_ctx(db), as_of=AS_OF)
    assert result["skipped"] is True and result["updated"] == 0


async def test_the_job_runs_in_a_maintenance_worker_and_the_model_shows_over_rest(
    db: asyncpg.Pool, clean_redis: Redis, seeded: None, app_client: httpx.AsyncClient, auth: dict[str, Any]
) -> None:
    await db.execute("DELETE FROM lifetime_value_models")
    missing = await app_client.get("/customers/lifetime-value-model", headers=auth["read"])
    assert missing.status_code == 404 and "no lifetime-value model" in missing.json()["detail"]
    job = await client.enqueue_task(clean_redis, OPERATOR, "update_customer_lifetime_values")
    burst = arq_burst("maintenance")
    assert burst.returncode == 0, burst.stderr
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete", status
    assert status.result["fit"]["converged"] and status.result["model"]["job_id"] == job.task_id
    shown = await app_client.get("/customers/lifetime-value-model", headers=auth["read"])
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["time_unit"] == "day" and body["horizon_days"] == 365 and body["job_id"] == job.task_id
    assert {k: body[k] for k in ("r", "alpha", "a", "b", "p", "q", "v")} == {
        k: status.result["model"][k] for k in ("r", "alpha", "a", "b", "p", "q", "v")
    }
    assert (await app_client.get("/customers/lifetime-value-model")).status_code == 401


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"as_of": (datetime.now(UTC) + timedelta(days=2)).date().isoformat()}, "is in the future"),
        ({"as_of": "2026-02-30"}, "as_of"),
        ({"day": "2026-01-01"}, "day: Extra inputs are not permitted"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_enqueued(
    clean_redis: Redis, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(TaskArgumentError) as refused:
        await client.enqueue_task(clean_redis, OPERATOR, "update_customer_lifetime_values", kwargs=kwargs)
    assert "bad arguments for update_customer_lifetime_values" in str(refused.value) and problem in str(refused.value)
    assert (await client.queue_overview(clean_redis))["maintenance"]["queued"] == 0


async def test_values_as_of_an_earlier_day_count_the_orders_up_to_its_end(db: asyncpg.Pool, seeded: None) -> None:
    as_of = (NOW - timedelta(days=50)).date()
    result = await update_customer_lifetime_values(job_ctx(db), as_of=as_of)
    assert result["as_of"] == as_of.isoformat() and result["model"]["as_of"] == as_of.isoformat()
    rows = await crafted(db)
    assert rows[2]["lifetime_value"] == Decimal("80.50")  # bought 200 and 100 days ago; not yet 10 days ago
    assert rows[3]["lifetime_value"] == Decimal("0.00") and rows[3]["predicted_ltv_12m"] is None  # bought later
    assert (await queries.latest_model(db)).as_of == as_of  # type: ignore[union-attr]  # the model fitted last
    today = await update_customer_lifetime_values(job_ctx(db))
    assert today["as_of"] == datetime.now(UTC).date().isoformat() and (await crafted(db))[2][
        "lifetime_value"
    ] == Decimal("120.75")


def test_only_values_that_differ_from_the_stored_ones_are_sent_back() -> None:
    nan = float("nan")
    ids = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    stored = queries.CustomerValues(
        ids, np.array([100, 200, 300, 400, -1]), np.array([0.5, nan, 0.25, 0.1, nan]),
        np.array([1.5, nan, 2.0, 0.3, nan]), np.array([900, -1, 50, 7, -1]),
    )  # fmt: skip
    new = queries.CustomerValues(
        ids, np.array([100, 200, 300, 400, 0]), np.array([0.5, nan, 0.25, nan, nan]),
        np.array([1.5, nan, 2.5, 0.3, nan]), np.array([900, -1, 50, 7, -1]),
    )  # fmt: skip
    # 1, 2 unchanged (two missing scores are equal); 3 a new expectation; 4 a score gone; 5 a first revenue
    assert new.changed_from(stored).customer_id.tolist() == [3, 4, 5]
    assert new.changed_from(new).customer_id.tolist() == []
    with pytest.raises(ValueError, match="same customers"):
        new.changed_from(queries.CustomerValues(ids[::-1], *(getattr(stored, n) for n in ("revenue_cents",
            "probability_alive", "expected_purchases", "predicted_cents"))))  # fmt: skip
