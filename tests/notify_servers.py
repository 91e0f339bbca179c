"""Real receivers on loopback for the notification tests: an SMTP server (aiosmtpd) that keeps what it accepts, and
an HTTP server that records webhook posts and answers with the statuses it is told to."""

from __future__ import annotations

import email
import email.policy
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Received:
    recipients: list[str]
    message: EmailMessage

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])

    def body(self, subtype: str) -> str:
        """The text/plain or text/html part (a multipart mail has both)."""
        part = self.message.get_body((subtype,))
        assert part is not None, f"no text/{subtype} part"
        return str(part.get_content())

    @property
    def text(self) -> str:
        return self.body("plain")

    @property
    def html(self) -> str:
        return self.body("html")


class MailSink:
    """An SMTP server on loopback; `messages` grows as mails arrive (one entry per accepted mail)."""

    def __init__(self, port: int | None = None, authenticator: Any = None, **smtp_options: Any) -> None:
        self.port = port or free_port()
        self.messages: list[Received] = []
        kwargs: dict[str, Any] = dict(smtp_options)  # e.g. tls_context and require_starttls
        if authenticator is not None:
            kwargs |= {"authenticator": authenticator, "auth_require_tls": "tls_context" in smtp_options}
        self.controller = Controller(self, hostname=HOST, port=self.port, **kwargs)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(Received(list(envelope.rcpt_tos), message))
        return "250 OK"

    def start(self) -> MailSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.recipients]


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    """An HTTP server on loopback: each POST is recorded and answered with the next of `statuses` (then 200)."""

    statuses: list[int] = field(default_factory=list)
    posts: list[Post] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.posts.append(Post(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def running_sink(**kwargs: Any) -> Iterator[MailSink]:
    sink = MailSink(**kwargs).start()
    try:
        yield sink
    finally:
        sink.stop()
