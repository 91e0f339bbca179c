"""The local SMTP sink `salesdash up` runs when no SMTP server is configured: an aiosmtpd server on loopback that keeps
every mail it receives in a Maildir under the data directory (SALESDASH_DATA_DIR/mail), so a first run shows real
mails end to end. The workers reach it through SALESDASH_SMTP_HOST/PORT, set for them here."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def start_mail_sink(mail_dir: Path) -> Controller:
    """Start the sink and point this process's environment (which the children inherit) at it."""
    mail_dir.parent.mkdir(parents=True, exist_ok=True)  # Maildir makes mail_dir itself, with its cur/ new/ tmp/
    controller = Controller(Mailbox(mail_dir), hostname=HOST, port=_free_port())
    controller.start()
    os.environ["SALESDASH_SMTP_HOST"] = HOST
    os.environ["SALESDASH_SMTP_PORT"] = str(controller.port)
    return controller
