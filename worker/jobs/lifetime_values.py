"""`update_customer_lifetime_values`: every customer's historical value (revenue to date) and predicted 12-month value
(BG/NBD expected purchases × Gamma-Gamma expected spend, worker/lifetime_model.py), in one transaction under an
advisory lock: the summary in one scan of orders, the fit and the scoring in a thread (off the event loop), the
write-back as one UPDATE of the rows that change. A fit that does not converge keeps the model fitted last."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import numpy as np
from pydantic import BaseModel, Field

from db.queries import lifetime_values as queries
from db.queries.lifetime_values import (
    HORIZON_DAYS,
    CustomerValues,
    Int64Array,
    LifetimeValueModel,
    ModelFit,
    ModelParameters,
    PurchaseSummary,
)
from worker import lifetime_model as lm
from worker.progress import report_progress

FIT_SAMPLE = 100_000  # customers the models are fitted on, at most (worker/lifetime_model.py `sample`)


class FitReport(BaseModel):
    converged: bool
    message: str  # why not, when it did not
    purchases_iterations: int
    spend_iterations: int


class LifetimeValuesResult(BaseModel):
    """The job result."""

    as_of: date  # the last local day of the orders summarised (by default today in SALESDASH_TIMEZONE)
    skipped: bool = False  # another run held the lock
    summarised: int = 0  # customers with revenue, and those whose values go back to zero revenue and no scores
    purchasers: int = 0  # customers with a purchase: they get a predicted value
    repeat_purchasers: int = 0
    fit: FitReport | None = None
    model: LifetimeValueModel | None = None  # the parameters the predictions come from; None: no model yet
    model_kept: bool = False  # this fit failed and the model fitted last was used
    updated: int = 0  # customers whose values changed
    seconds: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class _Scored:
    """What the thread hands back: today's fit (when it converged), the report, and the values to write."""

    fit: ModelFit | None
    report: FitReport
    values: CustomerValues


async def update_customer_lifetime_values(ctx: dict[str, Any], *, as_of: date | None = None) -> dict[str, Any]:
    """Values as of the end of the local day `as_of` (default: today in SALESDASH_TIMEZONE)."""
    settings = ctx["settings"]
    as_of = as_of or datetime.now(settings.tzinfo).date()
    async with ctx["db"].acquire() as conn, conn.transaction():
        if not await queries.try_lock(conn):
            return LifetimeValuesResult(as_of=as_of, skipped=True).model_dump(mode="json")
        result = await _run(ctx, conn, as_of)
    return result.model_dump(mode="json")


async def _run(ctx: dict[str, Any], conn: asyncpg.Connection, as_of: date) -> LifetimeValuesResult:
    settings, clock = ctx["settings"], _Stopwatch()
    await report_progress(ctx, 0.0, "summarising every customer's orders")
    await queries.tune(conn)
    summary = await queries.purchase_summary(conn, settings.timezone, as_of)
    previous = await queries.latest_model(conn)
    clock.lap("summary")
    await report_progress(ctx, 0.5, f"fitting the models to {int(np.count_nonzero(summary.purchase_days))} buyers")
    scored = await asyncio.to_thread(_fit_and_score, summary, previous, as_of, settings.ltv_fit_max_iterations)
    clock.lap("fit_and_score")
    await report_progress(ctx, 0.7, "writing the values back")
    model = await queries.save_model(conn, scored.fit, ctx.get("job_id")) if scored.fit else previous
    values = scored.values if summary.stored is None else scored.values.changed_from(summary.stored)
    updated = await queries.write_values(conn, values)
    clock.lap("write")
    return LifetimeValuesResult(
        as_of=as_of,
        summarised=len(summary.customer_id),
        purchasers=int(np.count_nonzero(summary.purchase_days)),
        repeat_purchasers=int(np.count_nonzero(summary.purchase_days > 1)),
        fit=scored.report,
        model=model,
        model_kept=scored.fit is None and model is not None,
        updated=updated,
        seconds=clock.seconds(),
    )


class _Stopwatch:
    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = round(now - self.last, 3), now

    def seconds(self) -> dict[str, float]:
        return {**self.laps, "total": round(self.last - self.started, 3)}


def model_summary(summary: PurchaseSummary) -> lm.Summary:
    """The models' inputs for the customers with a purchase: x = purchase days - 1, t_x, T, and m̄ = the mean
    revenue of the repeat purchase days (0 without one)."""
    buyers = summary.purchase_days > 0
    x = (summary.purchase_days[buyers] - 1).astype(np.float64)
    repeat_mean = np.divide(
        summary.repeat_cents[buyers] / 100.0, x, out=np.zeros_like(x), where=x > 0
    )  # fmt: skip
    return lm.Summary(
        x, summary.recency[buyers].astype(np.float64), summary.age[buyers].astype(np.float64), repeat_mean
    )


def fit_models(
    summary: lm.Summary, customer_ids: Int64Array, as_of: date, max_iterations: int
) -> tuple[ModelFit | None, FitReport]:
    """Both fits, on at most FIT_SAMPLE of the buyers (`customer_ids`, in the summary's order); a ModelFit only when
    both converged."""
    summary = lm.sample(summary, FIT_SAMPLE, customer_ids)
    purchases = lm.fit_purchases(summary, max_iterations=max_iterations)
    spend = lm.fit_spend(summary, max_iterations=max_iterations)
    failures = [
        f"{name}: {fit.message}" for name, fit in (("BG/NBD", purchases), ("Gamma-Gamma", spend)) if not fit.converged
    ]
    report = FitReport(
        converged=not failures,
        message="; ".join(failures),
        purchases_iterations=purchases.iterations,
        spend_iterations=spend.iterations,
    )
    if failures:
        return None, report
    r, alpha, a, b = purchases.params
    p, q, v = spend.params
    fit = ModelFit(
        as_of=as_of,
        customers=len(summary.frequency),
        repeat_customers=int(np.count_nonzero((summary.frequency > 0) & (summary.repeat_mean > 0))),
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        p=p,
        q=q,
        v=v,
        purchases_log_likelihood=purchases.log_likelihood,
        spend_log_likelihood=spend.log_likelihood,
    )
    return fit, report


def customer_values(summary: PurchaseSummary, inputs: lm.Summary, params: ModelParameters | None) -> CustomerValues:
    """Every customer's row: revenue always; scores for the buyers when there is a model (NaN / -1 otherwise)."""
    n = len(summary.customer_id)
    alive, purchases = np.full(n, np.nan), np.full(n, np.nan)
    predicted = np.full(n, -1, dtype=np.int64)
    if params is not None:
        buyers = summary.purchase_days > 0
        scores = lm.score(
            lm.PurchaseParams(params.r, params.alpha, params.a, params.b),
            lm.SpendParams(params.p, params.q, params.v),
            inputs,
            HORIZON_DAYS,
        )
        alive[buyers] = scores.probability_alive
        purchases[buyers] = scores.expected_purchases
        value = scores.predicted_value
        predicted[buyers] = np.where(np.isfinite(value), np.rint(np.nan_to_num(value) * 100), -1).astype(np.int64)
    return CustomerValues(summary.customer_id, summary.revenue_cents, alive, purchases, predicted)


def _fit_and_score(
    summary: PurchaseSummary, previous: LifetimeValueModel | None, as_of: date, max_iterations: int
) -> _Scored:
    inputs = model_summary(summary)
    fit, report = fit_models(inputs, summary.customer_id[summary.purchase_days > 0], as_of, max_iterations)
    params = fit if fit is not None else previous
    return _Scored(fit=fit, report=report, values=customer_values(summary, inputs, params))
