"""deploy/: Prometheus config and alert rules (promtool), the Grafana dashboard against a running app's /metrics,
the systemd units (systemd-analyze verify) and the supervisor programs."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from salesdash.config import get_settings
from tests.conftest import ROOT
from worker import jobstore
from worker.health import HealthCheck, HealthReport, store_report
from worker.metrics import MetricsBuffer
from worker.records import JobPayload
from worker.registry import Queue

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "salesdash-dashboard.json"
SYSTEMD = DEPLOY / "systemd"
QUEUES = sorted(q.value for q in Queue)
METRIC = re.compile(r"\bsalesdash_[a-z0-9_]+")


def _promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".venv" / "tools" / "promtool")
    if not Path(found).is_file():
        pytest.skip("promtool not available (`make test` fetches it where apt-get works)")
    return found


def _run(*argv: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = _promtool()
    config = _run(promtool, "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 6 rules found" in config.stdout  # check config also checks the rule files it names
    rules = _run(promtool, "check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alerts_fire_on_the_series_that_should_raise_them() -> None:
    result = _run(_promtool(), "test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_issue_list() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"SalesdashJobFailureRate", "SalesdashQueueBacklogAge", "SalesdashNoWorker", "SalesdashViewsStale"} <= names


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return queries


async def _exposed(app_client: httpx.AsyncClient, redis: Redis) -> dict[str, set[str]]:
    """Sample names in /metrics -> the label names they carry, after a worker's numbers and a health report
    are where a real run puts them."""
    buffer = MetricsBuffer()
    for status in ("started", "success", "failure", "retry", "aborted"):
        buffer.task_event("refresh_all_materialized_views", "analytics", status)
    buffer.duration("refresh_all_materialized_views", "analytics", 1.5)
    buffer.queue_wait("analytics", 0.2)
    await buffer.flush(redis)
    checks = [
        HealthCheck(check="rollups_daily_fresh", ok=False, detail="stale", values={"staleness_seconds": 9000.0}),
        HealthCheck(check="queue_workers_analytics", ok=True, detail="1 live worker", values={"workers": 1}),
    ]
    report = HealthReport(checked_at=datetime.now(UTC), ok=False, failing=["rollups_daily_fresh"], checks=checks)
    await store_report(redis, report)
    response = await app_client.get("/metrics")
    assert response.status_code == 200
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


async def test_every_metric_the_dashboard_and_alerts_query_is_exposed(
    app_client: httpx.AsyncClient, clean_redis: Redis
) -> None:
    exposed = await _exposed(app_client, clean_redis)
    alerts = [r["expr"] for r in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]]
    queries = _dashboard_queries()
    assert len(queries) >= 12
    for query in queries + alerts:
        for name in METRIC.findall(query):
            assert name in exposed, f"{name!r} (in {query!r}) is not in /metrics; it has {sorted(exposed)}"
        for label in re.findall(r"by \(([^)]*)\)", query):  # grouping labels must exist on the series
            for name in METRIC.findall(query):
                wanted = {part.strip() for part in label.split(",")} - {"le"}
                assert wanted <= exposed[name] | {"le"}, f"{query!r} groups {name} by {wanted}"
    assert "salesdash_queue_oldest_job_age_seconds" in exposed  # the live gauge the backlog alert reads


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def test_systemd_units_stop_workers_gracefully() -> None:
    shutdown = get_settings().shutdown_timeout
    worker = _unit(SYSTEMD / "salesdash-worker@.service")["Service"]
    assert worker["KillMode"] == "mixed"
    assert int(worker["TimeoutStopSec"]) > shutdown + 10  # the supervisor's own bound: shutdown timeout + 10 s
    assert worker["ExecStart"].split()[1:3] == ["worker", "%i"]
    assert _unit(SYSTEMD / "salesdash-api.service")["Service"]["KillMode"] == "mixed"
    wants = _unit(SYSTEMD / "salesdash.target")["Unit"]["Wants"].split()
    assert sorted(w.removeprefix("salesdash-worker@").removesuffix(".service") for w in wants if "@" in w) == QUEUES


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd's own parser on the units, with the install paths pointed at this checkout."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not available")
    units = []
    for source in sorted(SYSTEMD.glob("salesdash*.service")) + [SYSTEMD / "salesdash.target"]:
        text = source.read_text().replace("/etc/salesdash/salesdash.env", str(SYSTEMD / "salesdash.env"))
        text = text.replace("/opt/salesdash", str(ROOT))
        names = [source.name.replace("@.", f"@{q}.") for q in QUEUES] if "@." in source.name else [source.name]
        for name in names:
            (tmp_path / name).write_text(text)
            units.append(name)
    result = _run(analyze, "verify", "--man=no", *units, cwd=tmp_path)
    problems = [line for line in result.stderr.splitlines() if "salesdash" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_supervisor_programs() -> None:
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(DEPLOY / "supervisor" / "salesdash.conf")
    programs = conf["group:salesdash"]["programs"].split(",")
    assert sorted(programs) == sorted(["salesdash-api", *(f"salesdash-worker-{q}" for q in QUEUES)])
    for queue in QUEUES:
        program: Any = conf[f"program:salesdash-worker-{queue}"]
        assert f"salesdash worker {queue} " in program["command"]
        assert program["stopsignal"] == "TERM" and program["stopasgroup"] == "false"  # one SIGTERM, to the supervisor
        assert int(program["stopwaitsecs"]) > get_settings().shutdown_timeout + 10
    assert "uvicorn api.main:app" in conf["program:salesdash-api"]["command"]


def test_compose_monitoring_mounts_deploy_files() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


async def test_oldest_waiting_job_age_is_a_live_gauge(app_client: httpx.AsyncClient, clean_redis: Redis) -> None:
    """What SalesdashQueueBacklogAge reads: the wait of the longest-waiting due job, 0 for a queue with none."""
    now = jobstore.now_ms()
    waiting = JobPayload(jobstore.new_job_id(), "prune_job_history", [], {}, "maintenance", 5, now - 7000, now - 7000)
    assert await jobstore.enqueue(clean_redis, waiting)
    text = (await app_client.get("/metrics")).text
    ages = {
        sample.labels["queue"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "salesdash_queue_oldest_job_age_seconds"
    }
    assert ages["analytics"] == 0 and ages["notifications"] == 0
    assert 7 <= ages["maintenance"] < 60
