"""The embedded default: our own PostgreSQL and Redis under the data dir when no URLs are configured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest
import redis

from salesdash import embedded
from salesdash.config import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # resolve_urls exports the URLs; monkeypatch restores the environment afterwards
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    # a list of its own, so stop_started() here never stops the servers the rest of the suite runs on
    monkeypatch.setattr(embedded, "_started", [])
    yield
    embedded.stop_started()  # never leave servers behind, even when the test fails


def _settings(data_dir: Path) -> Settings:
    return Settings(DATABASE_URL=None, REDIS_URL=None, SALESDASH_DATA_DIR=str(data_dir))


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _resolve_in_child(data_dir: Path) -> tuple[str, str]:
    # a genuinely separate process: it must reuse our servers and leave them running when it exits
    code = textwrap.dedent(f"""
        import json
        from salesdash.config import Settings
        from salesdash.embedded import resolve_urls
        s = Settings(DATABASE_URL=None, REDIS_URL=None, SALESDASH_DATA_DIR={str(data_dir)!r})
        print(json.dumps(resolve_urls(s)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    db_url, redis_url = json.loads(out.stdout.strip().splitlines()[-1])
    return db_url, redis_url


def start_owner(data_dir: Path, out: Path) -> tuple[subprocess.Popen[bytes], tuple[str, str]]:
    """A separate process that starts (or reuses) the embedded servers, prints their URLs and stays alive,
    like a running `salesdash up`; kill it with SIGKILL to leave its servers orphaned."""
    code = textwrap.dedent(f"""
        import json, time
        from salesdash.config import Settings
        from salesdash.embedded import resolve_urls
        s = Settings(DATABASE_URL=None, REDIS_URL=None, SALESDASH_DATA_DIR={str(data_dir)!r})
        print(json.dumps(resolve_urls(s)), flush=True)
        time.sleep(300)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines()
        if lines and lines[-1].startswith('["'):
            db_url, redis_url = json.loads(lines[-1])
            return proc, (db_url, redis_url)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"the owner process did not start the servers:\n{out.read_text()}")


def server_states(data_dir: Path) -> dict[str, dict[str, float]]:
    """The state files: server pid, port, owner pid and the owner's start time, by server name."""
    return {name: json.loads((data_dir / name / "salesdash.json").read_text()) for name in ("postgres", "redis")}


def running(process: psutil.Process) -> bool:
    # a zombie counts as gone: orphans may never be reaped where init does not reap
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_configured_urls_start_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = Settings(
        DATABASE_URL="postgresql+asyncpg://u@db.example:5433/x",
        REDIS_URL="redis://cache.example:6380/2",
        SALESDASH_DATA_DIR=str(tmp_path / "data"),
    )
    already_started = list(embedded._started)  # other tests' servers, if any
    assert embedded.resolve_urls(settings) == (
        "postgresql://u@db.example:5433/x",
        "redis://cache.example:6380/2",
    )
    assert not (tmp_path / "data").exists()
    assert embedded._started == already_started
    assert "DATABASE_URL" not in os.environ and "REDIS_URL" not in os.environ


async def test_embedded_lifecycle(tmp_path: Path, clean_env: None) -> None:
    settings = _settings(tmp_path)

    # first start: initdb + both servers, URLs exported for child processes
    started = time.monotonic()
    db_url, redis_url = embedded.resolve_urls(settings)
    first_start = time.monotonic() - started
    assert first_start < 20, first_start
    assert db_url.startswith("postgresql://salesdash@127.0.0.1:") and db_url.endswith("/salesdash")
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")
    assert {_port(db_url), _port(redis_url)}.isdisjoint({5432, 6379})
    assert os.environ["DATABASE_URL"] == db_url and os.environ["REDIS_URL"] == redis_url
    assert (tmp_path / "postgres" / "data" / "PG_VERSION").exists()
    assert (tmp_path / "postgres" / "postgres.log").exists() and (tmp_path / "redis" / "redis.log").exists()

    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("select 1") == 1
        await conn.execute("create table kept (note text)")
        await conn.execute("insert into kept values ('survives restart')")
    finally:
        await conn.close()
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.set("kept", "survives restart")
    client.close()

    # reuse: again in this process, then from a separate process: same servers, same ports
    assert embedded.resolve_urls(settings) == (db_url, redis_url)
    assert _resolve_in_child(tmp_path) == (db_url, redis_url)
    assert _answers(_port(db_url)) and _answers(_port(redis_url)), "the child must not stop reused servers"

    # stop: the ports go quiet; stopping twice is harmless
    embedded.stop_started()
    embedded.stop_started()
    assert not _answers(_port(db_url)) and not _answers(_port(redis_url))

    # restart on the same data dir: no new initdb, and the data is still there
    started = time.monotonic()
    db_url2, redis_url2 = embedded.resolve_urls(settings)
    restart = time.monotonic() - started
    assert restart < 10, restart
    conn = await asyncpg.connect(db_url2)
    try:
        assert await conn.fetchval("select note from kept") == "survives restart"
    finally:
        await conn.close()
    client = redis.Redis.from_url(redis_url2)
    assert client.get("kept") == b"survives restart"
    client.close()
    print(f"first start {first_start:.2f} s, restart {restart:.2f} s")  # noqa: T201 (shown with -s)


def test_live_owner_keeps_its_servers_and_orphans_are_adopted(tmp_path: Path, clean_env: None) -> None:
    settings = _settings(tmp_path)
    owner, urls = start_owner(tmp_path, tmp_path / "owner.log")
    states = server_states(tmp_path)
    servers = [psutil.Process(int(state["pid"])) for state in states.values()]
    try:
        assert {state["owner"] for state in states.values()} == {owner.pid}
        # a second process reuses the servers of a live owner, and never stops them
        assert embedded.resolve_urls(settings) == urls
        assert embedded._started == []
        embedded.stop_started()
        assert server_states(tmp_path) == states
        assert all(_answers(_port(url)) for url in urls)

        owner.kill()  # no cleanup: its servers are orphaned, as after a crash or kill -9
        owner.wait()
        assert all(running(server) for server in servers)

        # the next process takes them over (same servers, nothing restarted) and stops them when it is done
        assert embedded.resolve_urls(settings) == urls
        adopted = server_states(tmp_path)
        assert [state["pid"] for state in adopted.values()] == [server.pid for server in servers]
        assert {state["owner"] for state in adopted.values()} == {os.getpid()}
        assert _resolve_in_child(tmp_path) == urls  # a third process leaves them to their new, live owner
        assert all(_answers(_port(url)) for url in urls)
        embedded.stop_started()
        assert not any(running(server) for server in servers)
        assert not any(_answers(_port(url)) for url in urls)
    finally:
        owner.kill()
        owner.wait()
        for server in servers:  # only when the test failed: never leave orphans behind
            if running(server):
                server.kill()
