"""Layers that point one way, and modules that are safe to import: importing any module of the project starts
no server and opens no connection (launching does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ["salesdash", "db", "worker", "api", "cli"]

_PROBE = """
import importlib, json, pkgutil, sys
import psutil
names = []
for package in {packages}:
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
me = psutil.Process()
print(json.dumps({{"modules": names, "children": [c.pid for c in me.children(recursive=True)],
                  "sockets": [str(c) for c in me.net_connections(kind="inet")]}}))
"""


def test_importing_every_module_starts_no_server_and_opens_no_connection(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SALESDASH_DATA_DIR"] = str(tmp_path / "data")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE.format(packages=PACKAGES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert {"worker.analytics", "worker.engine", "api.main", "cli.up", "salesdash.embedded"} <= set(seen["modules"])
    assert len(seen["modules"]) >= 40
    assert seen["children"] == [] and seen["sockets"] == []
    assert not (tmp_path / "data").exists()  # no embedded server was even prepared


def test_a_worker_launched_with_the_urls_unset_starts_the_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SALESDASH_DATA_DIR"] = str(tmp_path / "data")
    check = subprocess.run(
        [sys.executable, "-m", "arq", "--check", "worker.maintenance.Settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # no worker is alive on this fresh Redis, so the health check fails; but launching found a Redis to ask
    assert check.returncode == 1, check.stderr
    assert (tmp_path / "data" / "redis").is_dir()
