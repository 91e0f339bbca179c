"""The task table and the three queues' Settings agree, every task is a slice one hop from its name, and the
schedule is the documented one."""

from __future__ import annotations

import importlib
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from arq.cron import CronJob
from arq.worker import get_kwargs

from tests.conftest import ROOT
from worker.registry import TASKS, Queue

SETTINGS = {q: importlib.import_module(f"worker.{q.value}").Settings for q in Queue}


def test_every_task_is_on_exactly_one_queue_and_registered_there() -> None:
    for name, spec in TASKS.items():
        registering = [q for q, settings in SETTINGS.items() if name in {f.name for f in settings.functions}]
        assert registering == [spec.queue], name


def test_each_settings_registers_only_its_own_tasks() -> None:
    for queue, settings in SETTINGS.items():
        names = {f.name for f in settings.functions} | {c.name for c in settings.cron_jobs}
        assert names == {s.name for s in TASKS.values() if s.queue is queue}
        assert settings.queue_name == queue.queue_name == f"salesdash:queue:{queue.value}"


def test_settings_are_plain_classes_read_by_arq() -> None:
    for settings in SETTINGS.values():
        assert settings.__bases__ == (object,)  # arq ignores inherited attributes
        kwargs: dict[str, Any] = dict(get_kwargs(settings))
        assert kwargs["health_check_interval"] <= 30
        assert kwargs["job_serializer"]({"a": 1}) == b'{"a":1}'  # JSON, never pickle
        assert kwargs["on_startup"] and kwargs["on_shutdown"]
    assert len({s.queue_name for s in SETTINGS.values()}) == 3


def _next_runs(cron_job: CronJob, start: datetime, count: int) -> list[datetime]:
    runs, moment = [], start
    for _ in range(count):
        cron_job.calculate_next(moment)
        assert cron_job.next_run is not None
        runs.append(cron_job.next_run)
        moment = cron_job.next_run
    return runs


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("refresh_realtime_materialized_views", [f"2026-01-05 10:{m:02d}" for m in (5, 10, 15)]),
        ("refresh_daily_materialized_views", ["2026-01-05 11:00", "2026-01-05 12:00"]),
        ("warm_dashboard_cache", [f"2026-01-05 10:{m:02d}" for m in (2, 4, 6)]),
        ("check_low_stock_products", ["2026-01-06 09:00", "2026-01-07 09:00"]),
        ("generate_monthly_report", ["2026-02-01 06:00", "2026-03-01 06:00", "2026-04-01 06:00"]),
        ("prune_exports", ["2026-01-06 01:45", "2026-01-07 01:45"]),
        ("update_customer_segments", ["2026-01-06 02:00", "2026-01-07 02:00"]),
        ("clean_old_order_partitions", ["2026-01-11 04:00", "2026-01-18 04:00"]),  # Sundays
        ("create_order_partitions", ["2026-01-06 00:45", "2026-01-07 00:45"]),
        ("prune_old_records", ["2026-01-06 01:15", "2026-01-07 01:15"]),
        ("update_customer_lifetime_values", ["2026-01-06 03:00", "2026-01-07 03:00"]),
        ("check_system_health", ["2026-01-05 10:10", "2026-01-05 10:20", "2026-01-05 10:30"]),
        ("send_daily_summary", ["2026-01-06 08:00", "2026-01-07 08:00"]),
        ("weekly_performance_report", ["2026-01-12 08:00", "2026-01-19 08:00"]),  # Mondays
        ("check_alerts", ["2026-01-05 10:05", "2026-01-05 10:10", "2026-01-05 10:15"]),
        ("deliver_notifications", ["2026-01-05 10:01", "2026-01-05 10:02"]),
    ],
)
def test_cron_schedule_matches_the_documented_one(name: str, expected: list[str]) -> None:
    spec = TASKS[name]
    cron_job = SETTINGS[spec.queue].cron_jobs[[c.name for c in SETTINGS[spec.queue].cron_jobs].index(name)]
    start = datetime(2026, 1, 5, 10, 0, 30, tzinfo=ZoneInfo("UTC"))  # a Monday
    runs = _next_runs(cron_job, start, len(expected))
    assert [r.strftime("%Y-%m-%d %H:%M") for r in runs] == expected
    assert all(r.second == 0 for r in runs)


def test_realtime_refresh_runs_twelve_times_an_hour() -> None:
    spec = TASKS["refresh_realtime_materialized_views"]
    cron_job = next(c for c in SETTINGS[spec.queue].cron_jobs if c.name == spec.name)
    start = datetime(2026, 1, 5, 0, 0, 30, tzinfo=ZoneInfo("UTC"))
    runs = _next_runs(cron_job, start, 12)
    assert runs[-1] - runs[0] == timedelta(minutes=55)
    assert [r.minute for r in runs] == list(range(5, 60, 5)) + [0]


def test_scheduled_tasks_keep_their_policy_when_arq_registers_the_cron_job() -> None:
    settings = SETTINGS[Queue.ANALYTICS]
    spec = TASKS["refresh_realtime_materialized_views"]
    cron_job = next(c for c in settings.cron_jobs if c.name == spec.name)
    assert cron_job.keep_result_s == spec.keep_result_s and cron_job.timeout_s == spec.timeout_s
    assert cron_job.max_tries == spec.retry.max_tries


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_is_a_slice_one_hop_from_its_name(name: str) -> None:
    """Declaration in worker/registry.py; coroutine `name` in worker/jobs/<domain>.py; SQL in
    db/queries/<domain>.py; tests in tests/test_<domain>.py (README "Adding a task")."""
    domain = TASKS[name].domain
    job_module = importlib.import_module(f"worker.jobs.{domain}")
    assert callable(getattr(job_module, name)), f"worker/jobs/{domain}.py has no {name}"
    assert (ROOT / "db" / "queries" / f"{domain}.py").is_file()
    assert (ROOT / "tests" / f"test_{domain}.py").is_file()


def test_the_task_table_imports_no_job_code() -> None:
    probe = (
        "import sys, worker.registry, worker.client; "
        "print(sorted(m for m in sys.modules if m.startswith(('worker.jobs.', 'worker.engine', 'db.seed'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"  # the API and the CLI validate and enqueue without loading job code
