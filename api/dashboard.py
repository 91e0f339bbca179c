"""The monitoring page (`GET /dashboard`): queues, workers and recent jobs, server-rendered and self-refreshing.
Kept apart from the worker core (as SAQ does): it only reads what worker.client exposes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Cookie, Form, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.deps import DbDep, RedisDep, TokensDep
from salesdash.auth import AuthError, Scope, require
from worker import client

router = APIRouter()
_templates = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape())
COOKIE = "salesdash_token"

_LOGIN = """<!doctype html><meta charset="utf-8"><title>salesdash · sign in</title>
<form method="post" action="/dashboard/login" style="font:14px system-ui;margin:3rem">
<p>{message}</p><label>API token (read scope) <input name="token" type="password" size="50" autofocus></label>
<button>Open dashboard</button></form>"""


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    db: DbDep,
    redis: RedisDep,
    tokens: TokensDep,
    authorization: Annotated[str | None, Header()] = None,
    salesdash_token: Annotated[str | None, Cookie()] = None,
) -> HTMLResponse:
    """Bearer header for scripts; a cookie set by the sign-in form for browsers."""
    try:
        credentials = authorization or (f"Bearer {salesdash_token}" if salesdash_token else None)
        require(await tokens.authenticate(db, credentials), Scope.READ)
    except AuthError as exc:
        return HTMLResponse(_LOGIN.format(message=exc), status_code=exc.status_code)
    queues = await client.queue_overview(redis)
    workers = await client.workers(redis)
    jobs = await client.list_jobs(redis, db, limit=50)
    html = _templates.get_template("dashboard.html").render(queues=queues, workers=workers, jobs=jobs)
    return HTMLResponse(html)


@router.post("/dashboard/login")
async def login(db: DbDep, tokens: TokensDep, token: Annotated[str, Form()]) -> RedirectResponse:
    try:
        require(await tokens.authenticate(db, f"Bearer {token}"), Scope.READ)
    except AuthError:
        return RedirectResponse("/dashboard", status_code=303)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response
