"""The operators' monitoring page (`GET /dashboard`) and the JSON it polls (`/dashboard/api/…`).

The page is server-rendered once; a small script (api/templates/dashboard.js, no build step) fetches the JSON every
few seconds and redraws with DOM text nodes only, so no value from a job is ever parsed as HTML. Reads come from
worker.monitoring, changes go through the job service (worker.client), which checks the scope of every action.
Who the caller is comes from one dependency, `page_principal`: how a browser signs in can change behind it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from api import sessions
from api.deps import DbDep, RedisDep
from api.errors import error_responses
from api.rest import QueueName, TaskId, trigger_refusal
from salesdash.auth import AuthError, Principal, Scope, require
from worker import client, dashboard, monitoring
from worker.cache import CacheBusyError
from worker.records import PRIORITY_DEFAULT
from worker.registry import UnknownTaskError

router = APIRouter()
_TEMPLATES = Path(__file__).with_name("templates")
_templates = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]))


async def page_principal(request: Request) -> Principal:
    """THE way the page and its JSON learn who is asking: a bearer header for scripts, else the server-side session
    (api.sessions) the sign-in form started. UnauthenticatedError / ForbiddenError otherwise."""
    principal = await sessions.request_principal(request)
    require(principal, Scope.READ)
    return principal


PagePrincipal = Annotated[Principal, Depends(page_principal)]


def _sign_in(message: str, status_code: int) -> HTMLResponse:
    return HTMLResponse(_templates.get_template("sign_in.html").render(message=message), status_code=status_code)


_SIGN_IN = {"content": {"text/html": {}}, "description": "the sign-in form (no token, or not a read token)"}


@router.get("/dashboard", response_class=HTMLResponse, responses={401: _SIGN_IN, 403: _SIGN_IN})
async def page(request: Request) -> HTMLResponse:
    try:
        principal = await page_principal(request)
    except AuthError as exc:
        return _sign_in(str(exc), exc.status_code)
    scopes = {
        "trigger": principal.allows(Scope.TRIGGER),
        "admin": principal.allows(Scope.ADMIN),
    }
    html = _templates.get_template("dashboard.html").render(
        scopes=scopes, queues=client.QUEUES, tasks=sorted(t.name for t in client.task_table())
    )
    return HTMLResponse(html)


class JavaScriptResponse(Response):
    media_type = "text/javascript"


@router.get(
    "/dashboard/dashboard.js", response_class=JavaScriptResponse, responses={200: {"description": "the page's script"}}
)
async def script() -> JavaScriptResponse:
    return JavaScriptResponse((_TEMPLATES / "dashboard.js").read_bytes())


_TO_DASHBOARD: dict[int | str, dict[str, Any]] = {
    303: {"description": "to /dashboard, signed in"},
    401: _SIGN_IN,
    403: _SIGN_IN,
    **error_responses(413, 422),
}


@router.post("/dashboard/login", status_code=303, response_class=RedirectResponse, responses=_TO_DASHBOARD)
async def login(request: Request, token: Annotated[str, Form()]) -> Response:
    """A session for a token with `read`; the sign-in form again, saying why, for any other."""
    response = RedirectResponse("/dashboard", status_code=303)
    try:
        await sessions.sign_in(request, response, token)
    except AuthError as exc:
        return _sign_in(str(exc), exc.status_code)
    return response


@router.post(
    "/dashboard/logout",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "to /dashboard, the session ended"}},
)
async def logout(request: Request) -> RedirectResponse:
    response = RedirectResponse("/dashboard", status_code=303)
    await sessions.sign_out(request, response)
    return response


# ---- reads ---------------------------------------------------------------------------------------------------
@router.get("/dashboard/api/overview", responses=error_responses(401, 403))
async def overview(redis: RedisDep, db: DbDep, _: PagePrincipal) -> monitoring.Overview:
    return await monitoring.overview(redis, db)


@router.get("/dashboard/api/jobs", responses=error_responses(401, 403, 422))
async def jobs(
    redis: RedisDep,
    db: DbDep,
    _: PagePrincipal,
    task: str | None = None,
    queue: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = Query(None, max_length=200),
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> monitoring.JobPage:
    wanted = monitoring.JobFilter(task or None, queue or None, status or None, since, until, q or None, page)
    try:
        return await monitoring.search_jobs(redis, db, wanted)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None


@router.get("/dashboard/api/jobs/{job_id}", responses=error_responses(401, 403, 404, 422))
async def job(job_id: TaskId, redis: RedisDep, db: DbDep, principal: PagePrincipal) -> monitoring.JobDetail:
    try:
        return await monitoring.job_detail(redis, db, principal, job_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None


@router.get("/dashboard/api/tasks", responses=error_responses(401, 403))
async def tasks(principal: PagePrincipal) -> list[monitoring.TaskForm]:
    return monitoring.task_forms(principal)


@router.get("/dashboard/api/sales", responses=error_responses(401, 403))
async def sales(redis: RedisDep, db: DbDep, _: PagePrincipal) -> dict[str, Any]:
    """What the analytics cache holds for today (computed once on a miss, as GraphQL's fields are)."""
    reads: dict[str, tuple[dashboard.DashboardQuery[Any], dict[str, Any]]] = {
        "overview": (dashboard.SALES_OVERVIEW, {"range": "today"}),
        "hourly": (dashboard.HOURLY_METRICS, {"hours": 24}),
        "top_products": (dashboard.TOP_PRODUCTS, {"range": "last_7_days", "limit": 10}),
        "low_stock": (dashboard.LOW_STOCK_PRODUCTS, {}),
    }
    try:
        return {
            name: (await dashboard.read(redis, db, query, args)).model_dump(mode="json")
            for name, (query, args) in reads.items()
        }
    except CacheBusyError as exc:
        raise HTTPException(503, detail=str(exc)) from None


# ---- actions: the job service checks each one's scope ----------------------------------------------------------
class Trigger(BaseModel):  # type: ignore[no-redef]  # the pydantic plugin trips on a field named kwargs
    task_name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    priority: int = PRIORITY_DEFAULT


class Done(BaseModel):
    task_id: str | None = None
    message: str


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The job service's refusals of an action, as the answers the page shows."""
    try:
        yield
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except (UnknownTaskError, ValueError) as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except (client.RateLimitedError, client.IdempotencyConflictError) as exc:
        raise trigger_refusal(exc) from None
    except client.NotReplicatedError as exc:
        raise HTTPException(503, detail=str(exc)) from None


@router.post("/dashboard/api/jobs", status_code=202, responses=error_responses(401, 403, 409, 422, 429))
async def trigger(body: Trigger, redis: RedisDep, principal: PagePrincipal) -> Done:
    with _refusals():
        job = await client.enqueue_task(redis, principal, body.task_name, [], body.kwargs, body.priority)
    return Done(task_id=job.task_id, message=f"{job.task_name} queued on {job.queue}")


@router.post("/dashboard/api/jobs/{job_id}/abort", responses=error_responses(401, 403, 404, 409, 422))
async def abort(job_id: TaskId, redis: RedisDep, db: DbDep, principal: PagePrincipal) -> Done:
    with _refusals():
        previous = await client.abort_job(redis, db, principal, job_id)
    return Done(task_id=job_id, message=f"aborted (it was {previous})")


@router.post(
    "/dashboard/api/jobs/{job_id}/retry", status_code=202, responses=error_responses(401, 403, 404, 409, 422, 429)
)
async def retry(job_id: TaskId, redis: RedisDep, db: DbDep, principal: PagePrincipal) -> Done:
    with _refusals():
        job = await client.retry_job(redis, db, principal, job_id)
    return Done(task_id=job.task_id, message=f"retrying as {job.task_id}")


@router.post("/dashboard/api/queues/{queue}/purge", responses=error_responses(401, 403, 404))
async def purge(queue: QueueName, redis: RedisDep, principal: PagePrincipal) -> Done:
    try:
        removed = await client.purge_queue(redis, principal, queue)
    except ValueError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    return Done(message=f"purged {removed} waiting job(s) from {queue}")
