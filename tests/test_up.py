"""`salesdash up` (what `make run` runs) on a machine with no servers configured: embedded PostgreSQL and
Redis, migrations, demo data, API and three workers; /healthz answers within 60 s; a job runs; the daily summary
lands in the local SMTP sink's Maildir; SIGTERM stops
everything and leaves no process behind. SIGHUP (the terminal closed) does the same, and a run that finds the
servers of a killed run takes them over and stops them too."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ROOT
from tests.test_embedded import running, server_states, start_owner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # a PostgreSQL backend that ended meanwhile
        return ""


def test_up_serves_runs_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SALESDASH_DATA_DIR"] = str(tmp_path / "data")
    log_path = tmp_path / "up.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port), "--api-workers", "2"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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
        # no SMTP server configured: the daily summary lands in the local sink's Maildir under the data directory
        summary = httpx.post(f"{base}/jobs", json={"task_name": "send_daily_summary"}, headers=headers)
        assert summary.status_code == 202, summary.text
        sent = _wait_complete(f"{base}/jobs/{summary.json()['task_id']}", headers)
        assert sent["status"] == "complete" and sent["result"]["notification_id"], sent
        (mail,) = _wait_mail(tmp_path / "data" / "mail" / "new")  # sent by the job, or by the minute's sender
        assert b"Subject: Daily summary for" in mail.read_bytes()
        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 7  # postgres (+ its backends), redis, api, three workers
        api_servers = [p for p in family if "spawn_main" in _cmdline(p)]  # uvicorn's workers
        assert len(api_servers) == 2 and "API processes: 2" in log_path.read_text()  # --api-workers 2
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
    time.sleep(0.5)
    leftovers = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, [p.cmdline() for p in leftovers]
    assert time.monotonic() - started < 150


def _wait_mail(new_mail: Path, deadline_s: float = 90) -> list[Path]:
    deadline = time.monotonic() + deadline_s
    while not (new_mail.is_dir() and any(new_mail.iterdir())):
        assert time.monotonic() < deadline, f"no mail in {new_mail}"
        time.sleep(0.5)
    return list(new_mail.iterdir())


def _start_up(tmp_path: Path, data_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SALESDASH_DATA_DIR"] = str(data_dir)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        # its own session, like `make run` in a terminal: the process group gets the terminal's SIGHUP
        up = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return up, log_path


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _assert_all_gone(processes: list[psutil.Process], ports: list[int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if running(p)]
        listening = [port for port in ports if _listens(port)]
        if not alive and not listening:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {[p.cmdline() for p in alive]}, ports {listening}")
        time.sleep(0.2)


def _kill_leftovers(up: subprocess.Popen[bytes], data_dir: Path, processes: list[psutil.Process]) -> None:
    # only when a test failed: never leave processes behind for the rest of the suite
    if up.poll() is None:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    with contextlib.suppress(OSError, ValueError):
        for state in server_states(data_dir).values():
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(int(state["pid"]))
                if Path(server.cwd()).is_relative_to(data_dir):  # ours, not a process that reused the pid
                    processes.append(server)
    for process in processes:
        if running(process):
            process.kill()


def test_sighup_stops_everything_embedded_servers_included(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    up, log_path = _start_up(tmp_path, data_dir, port)
    family: list[psutil.Process] = []
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", up, log_path, deadline_s=60)
        states = server_states(data_dir)
        assert {state["owner"] for state in states.values()} == {up.pid}
        servers = [psutil.Process(int(state["pid"])) for state in states.values()]
        family = psutil.Process(up.pid).children(recursive=True)
        assert {s.pid for s in servers} <= {p.pid for p in family}
        assert len(family) >= 6  # postgres (+ its backends), redis, api, three workers
        os.killpg(up.pid, signal.SIGHUP)  # what closing the terminal sends its foreground process group
        code = up.wait(timeout=60)
        assert code == 0, log_path.read_text()[-3000:]
        _assert_all_gone(family + servers, [port, *(int(state["port"]) for state in states.values())])
    finally:
        _kill_leftovers(up, data_dir, family)


def test_up_stops_the_servers_it_took_over_from_a_killed_run(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    # a run that starts the embedded servers and is killed outright: nothing stops its servers
    owner, _ = start_owner(data_dir, tmp_path / "owner.log")
    owner.kill()
    owner.wait()
    orphaned = server_states(data_dir)
    servers = [psutil.Process(int(state["pid"])) for state in orphaned.values()]
    assert all(running(server) for server in servers)
    up, log_path = _start_up(tmp_path, data_dir, port)
    family: list[psutil.Process] = []
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", up, log_path, deadline_s=60)
        adopted = server_states(data_dir)
        assert [state["pid"] for state in adopted.values()] == [server.pid for server in servers]  # reused
        assert {state["owner"] for state in adopted.values()} == {up.pid}  # and now owned by this run
        family = psutil.Process(up.pid).children(recursive=True)
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        assert code == 0, log_path.read_text()[-3000:]
        _assert_all_gone(family + servers, [port, *(int(state["port"]) for state in orphaned.values())])
    finally:
        _kill_leftovers(up, data_dir, family)


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


def _wait_complete(url: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(url, headers=headers).json()
        if status["status"] in ("complete", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job not finished: {status}")
