"""The monitoring page (`GET /dashboard`): queues, workers and recent jobs, server-rendered and self-refreshing.
Kept apart from the worker core (as SAQ does): it only reads what worker.client exposes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api import sessions
from api.deps import DbDep, RedisDep
from api.errors import error_responses
from salesdash.auth import AuthError, Scope, require
from worker import client

router = APIRouter()
_templates = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape())

_LOGIN = """<!doctype html><meta charset="utf-8"><title>salesdash · sign in</title>
<form method="post" action="/dashboard/login" style="font:14px system-ui;margin:3rem">
<p>{message}</p><label>API token (read scope) <input name="token" type="password" size="50" autofocus></label>
<button>Open dashboard</button></form>"""


_SIGN_IN = {"content": {"text/html": {}}, "description": "the sign-in form (no token, or not a read token)"}


@router.get("/dashboard", response_class=HTMLResponse, responses={401: _SIGN_IN, 403: _SIGN_IN})
async def dashboard(request: Request, db: DbDep, redis: RedisDep) -> HTMLResponse:
    """Bearer header for scripts; a server-side session (api.sessions) for browsers."""
    try:
        require(await sessions.request_principal(request), Scope.READ)
    except AuthError as exc:
        return HTMLResponse(_LOGIN.format(message=exc), status_code=exc.status_code)
    queues = await client.queue_overview(redis)
    workers = await client.workers(redis)
    jobs = await client.list_jobs(redis, db, limit=50)
    html = _templates.get_template("dashboard.html").render(queues=queues, workers=workers, jobs=jobs)
    return HTMLResponse(html)


_TO_DASHBOARD: dict[int | str, dict[str, Any]] = {
    303: {"description": "to /dashboard, signed in or (a bad token) back to the form"},
    **error_responses(413, 422),
}


@router.post("/dashboard/login", status_code=303, response_class=RedirectResponse, responses=_TO_DASHBOARD)
async def login(request: Request, token: Annotated[str, Form()]) -> RedirectResponse:
    response = RedirectResponse("/dashboard", status_code=303)
    with contextlib.suppress(AuthError):  # refused: back to the form, which says why
        await sessions.sign_in(request, response, token)
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
