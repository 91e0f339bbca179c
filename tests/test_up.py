"""`salesdash up` (what `make run` runs) on a machine with no servers configured: embedded PostgreSQL and
Redis, migrations, demo data, API and three workers; /healthz answers within 60 s; a job runs; SIGTERM stops
everything and leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_up_serves_runs_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SALESDASH_DATA_DIR"] = str(tmp_path / "data")
    log_path = tmp_path / "up.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        healthy_after = _wait_healthy(base, up, log_path, deadline_s=60)
        assert healthy_after < 60
        token = re.search(r"admin token \(this run\): (\S+)", log_path.read_text())
        assert token, log_path.read_text()
        headers = {"Authorization": f"Bearer {token.group(1)}"}
        job = httpx.post(f"{base}/jobs", json={"task_name": "refresh_all_materialized_views"}, headers=headers)
        assert job.status_code == 202, job.text
        status = _wait_complete(f"{base}/jobs/{job.json()['task_id']}", headers)
        assert status["status"] == "complete", status
        assert all(v["rows"] > 0 for v in status["result"]["views"])  # demo data was seeded
        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 6  # postgres (+ its backends), redis, api, three workers
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
    time.sleep(0.5)
    leftovers = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, [p.cmdline() for p in leftovers]
    assert time.monotonic() - started < 150


def _wait_healthy(base: str, up: subprocess.Popen[bytes], log_path: Path, deadline_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        assert up.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/healthz did not answer within {deadline_s}s:\n{log_path.read_text()}")


def _wait_complete(url: str, headers: dict[str, str]) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status: dict[str, object] = httpx.get(url, headers=headers).json()
        if status["status"] in ("complete", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job not finished: {status}")
