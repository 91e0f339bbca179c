"""Browser-facing hardening (docs/rest.md#browser-security): security headers on every answer, a content security
policy on every HTML one, and CORS only when origins are configured.

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: it only adds headers to the response start, so it
costs a trigger on the hot path next to nothing."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salesdash.config import Settings

# GraphiQL and FastAPI's /docs load their scripts and styles from these CDNs; the dashboard needs only itself
_CDNS = "https://unpkg.com https://cdn.jsdelivr.net"
CONTENT_SECURITY_POLICY = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {_CDNS}; style-src 'self' 'unsafe-inline' {_CDNS}; "
    f"img-src 'self' data: https://fastapi.tiangolo.com; font-src 'self' data: {_CDNS}; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
# on every answer (api.graphql_memo answers a memo hit in front of this middleware with these too)
EVERY_ANSWER = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
_HTML_ANSWER = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                headers += EVERY_ANSWER
                if content_type.startswith(b"text/html"):
                    headers += _HTML_ANSWER
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def harden(app: FastAPI, settings: Settings) -> None:
    """Add the security headers, and CORS for the configured origins only (none: no CORS headers at all)."""
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
