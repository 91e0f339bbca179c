"""Stored reports (docs/rest.md#reports): a filtered list, and one report as JSON or, for `Accept: text/html`,
as its self-contained HTML page. Thin: parse, call db.queries.reports, shape the answer."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query
from fastapi.responses import HTMLResponse
from pydantic import Field

from api.deps import DbDep, ReadDep
from api.errors import error_responses
from db.queries import reports as queries
from db.queries.reports import MonthlyReport, ReportSummary, WeeklyReport
from salesdash.periods import parse_day_or_month

router = APIRouter(tags=["reports"])

REPORT_KINDS = ("monthly", "weekly")
MAX_ID = 2**63 - 1  # reports.id is a bigint: a larger id could never exist
# The page carries everything it shows; the policy makes the browser refuse anything it would fetch.
PAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


class Report(ReportSummary):
    payload: Annotated[MonthlyReport | WeeklyReport, Field(discriminator="kind")]


@router.get("/reports", responses=error_responses(401, 403, 422))
async def list_reports(
    db: DbDep,
    _: ReadDep,
    kind: Annotated[str | None, Query(max_length=32, description="monthly")] = None,
    from_: Annotated[str | None, Query(alias="from", max_length=10, description="YYYY-MM or YYYY-MM-DD")] = None,
    to: Annotated[str | None, Query(max_length=10, description="YYYY-MM (its last day) or YYYY-MM-DD")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[ReportSummary]:
    """Reports whose period overlaps [from, to], newest period first."""
    if kind is not None and kind not in REPORT_KINDS:
        raise HTTPException(422, detail=f"kind: unknown report kind {kind!r}; kinds: {', '.join(REPORT_KINDS)}")
    start, end = _day("from", from_, end=False), _day("to", to, end=True)
    if start and end and start > end:
        raise HTTPException(422, detail=f"from: {start} is after to ({end})")
    return await queries.list_reports(db, kind=kind, overlapping_from=start, overlapping_to=end, limit=limit)


@router.get(
    "/reports/{report_id}",
    response_model=Report,
    responses={
        200: {"content": {"text/html": {}}, "description": "JSON, or the HTML page for Accept: text/html"},
        **error_responses(401, 403, 404, 406, 422),
    },
)
async def get_report(
    db: DbDep,
    _: ReadDep,
    report_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    accept: Annotated[str | None, Header()] = None,
) -> Report | HTMLResponse:
    stored = await queries.get_report(db, report_id)
    if stored is None:
        raise HTTPException(404, detail=f"no report with id {report_id}")
    if not prefers_html(accept):
        return Report.model_validate(stored.model_dump(exclude={"html"}))
    if stored.html is None:
        raise HTTPException(406, detail=f"report {report_id} has no HTML page; ask for application/json")
    return HTMLResponse(stored.html, headers={"Content-Security-Policy": PAGE_POLICY})


def _day(name: str, value: str | None, *, end: bool) -> date | None:
    try:
        return None if value is None else parse_day_or_month(value, end=end)
    except ValueError as exc:
        raise HTTPException(422, detail=f"{name}: {exc}") from None


def prefers_html(accept: str | None) -> bool:
    """True when the Accept header ranks text/html above application/json (a browser's does); JSON otherwise."""
    quality: dict[str, float] = {}
    for item in (accept or "").split(","):
        media, _, params = item.strip().partition(";")
        q = next((p.split("=", 1)[1] for p in params.split(";") if p.strip().startswith("q=")), "1")
        try:
            quality[media.strip().lower()] = float(q)
        except ValueError:
            continue

    def rank(kind: str, family: str) -> float:
        return quality.get(kind, quality.get(family, quality.get("*/*", 0.0)))  # the most specific range decides

    return rank("text/html", "text/*") > rank("application/json", "application/*")
