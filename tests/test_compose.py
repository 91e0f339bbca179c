"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine needed).

The compose file is parsed with yaml.safe_load, which resolves its anchors and `<<` merge keys the
way Compose does, so each service is checked as Compose will see it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

QUEUES = ("analytics", "maintenance", "notifications")
WORKERS = {f"worker-{queue}": queue for queue in QUEUES}
APP_SERVICES = ("migrate", "api", *WORKERS)
MONITORING_SERVICES = ("prometheus", "grafana")  # only with `--profile monitoring`
EXPECTED_SERVICES = {"postgres", "redis", *APP_SERVICES, *MONITORING_SERVICES}
# Workers drain running jobs for SALESDASH_SHUTDOWN_TIMEOUT (30 s) after SIGTERM.
MIN_WORKER_GRACE_SECONDS = 35


def _load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE.get("services") or {}


def _argv(command: Any) -> list[str]:
    """A compose command (string or list) as an argv list."""
    if isinstance(command, str):
        return shlex.split(command)
    assert isinstance(command, list), f"unexpected command form: {command!r}"
    return [str(part) for part in command]


def _healthcheck_argv(service: str) -> list[str]:
    test = (SERVICES[service].get("healthcheck") or {}).get("test")
    assert test, f"{service} has no healthcheck test"
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    if kind == "CMD":
        return [str(part) for part in rest]
    assert kind == "CMD-SHELL", f"{service}: healthcheck test must start with CMD or CMD-SHELL"
    return shlex.split(" ".join(rest))


def _contains(argv: list[str], expected: list[str]) -> bool:
    n = len(expected)
    return any(argv[i : i + n] == expected for i in range(len(argv) - n + 1))


def _environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _depends_on(service: str) -> dict[str, str | None]:
    deps = SERVICES[service].get("depends_on") or {}
    if isinstance(deps, list):  # short form: no condition (= service_started)
        return dict.fromkeys(deps)
    return {name: (spec or {}).get("condition") for name, spec in deps.items()}


def _duration_seconds(value: Any) -> float:
    """Compose duration ("40s", "1m30s", "1h") or a plain number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {value!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _mount_targets(service: str) -> set[str]:
    targets = set()
    for volume in SERVICES[service].get("volumes") or []:
        if isinstance(volume, dict):
            targets.add(str(volume.get("target")))
        else:
            parts = str(volume).split(":")
            targets.add(parts[1] if len(parts) > 1 else parts[0])
    return targets


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


# ---------------------------------------------------------------- services


def test_service_set() -> None:
    assert set(SERVICES) == EXPECTED_SERVICES


def test_depends_on_targets_exist() -> None:
    for name in SERVICES:
        for dependency in _depends_on(name):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency!r}"


def test_postgres_and_redis() -> None:
    postgres = SERVICES["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    assert "pg_isready" in _healthcheck_argv("postgres")

    redis = SERVICES["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert _contains(_argv(redis["command"]), ["--appendonly", "yes"]), "redis must run with AOF on"
    assert _contains(_argv(redis["command"]), ["--appendfsync", "everysec"]), "the AOF fsync policy is set explicitly"
    assert _contains(_healthcheck_argv("redis"), ["redis-cli", "ping"])

    declared = set(COMPOSE.get("volumes") or {})
    for service, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        volumes = [str(v) for v in SERVICES[service].get("volumes") or []]
        named = [v.split(":", 1)[0] for v in volumes if v.endswith(f":{target}")]
        assert named and named[0] in declared, f"{service} must keep {target} on a named volume"


@pytest.mark.parametrize("service", sorted(WORKERS))
def test_worker_command_and_healthcheck(service: str) -> None:
    settings = f"worker.{WORKERS[service]}.Settings"
    assert _argv(SERVICES[service]["command"]) == ["arq", settings]
    assert _contains(_healthcheck_argv(service), ["arq", "--check", settings])


@pytest.mark.parametrize("service", sorted(WORKERS))
def test_worker_shutdown_and_restart(service: str) -> None:
    spec = SERVICES[service]
    assert _duration_seconds(spec.get("stop_grace_period", "10s")) >= MIN_WORKER_GRACE_SECONDS
    assert spec.get("restart") == "unless-stopped"


@pytest.mark.parametrize("queue", QUEUES)
def test_worker_modules_exist(queue: str) -> None:
    assert (ROOT / "worker" / f"{queue}.py").is_file(), f"worker/{queue}.py is referenced by compose"


def test_migrate_command_and_dependencies() -> None:
    assert _argv(SERVICES["migrate"]["command"]) == ["salesdash", "migrate"]
    assert _depends_on("migrate").get("postgres") == "service_healthy"


@pytest.mark.parametrize("service", ["api", *sorted(WORKERS)])
def test_waits_for_migrate_and_redis(service: str) -> None:
    deps = _depends_on(service)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("redis") == "service_healthy"


def test_api_command_port_and_healthcheck() -> None:
    api = SERVICES["api"]
    argv = _argv(api["command"])
    assert argv[0] == "uvicorn" and "api.main:app" in argv
    assert _contains(argv, ["--host", "0.0.0.0"]) and _contains(argv, ["--port", "8000"])
    assert any(str(port).endswith(":8000") for port in api.get("ports") or [])
    check = " ".join(_healthcheck_argv("api"))
    assert "urllib" in check and "/healthz" in check and "curl" not in check


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_environment(service: str) -> None:
    env = _environment(service)
    database = urlsplit(env["DATABASE_URL"])
    assert database.scheme in {"postgresql", "postgresql+asyncpg"}
    assert database.hostname == "postgres" and "postgres" in SERVICES
    redis = urlsplit(env["REDIS_URL"])
    assert redis.scheme == "redis" and redis.hostname == "redis" and "redis" in SERVICES
    data_dir = env["SALESDASH_DATA_DIR"]
    assert data_dir.startswith("/")
    assert data_dir in _mount_targets(service), f"{service} must mount a volume at {data_dir}"
    assert env.get("SALESDASH_TIMEZONE") == "${SALESDASH_TIMEZONE:-UTC}"


def test_app_services_share_one_image_and_data_volume() -> None:
    images = {SERVICES[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1 and None not in images, f"app services must share one image, got {images}"
    builders = [name for name in APP_SERVICES if SERVICES[name].get("build")]
    assert builders, "one app service must build the shared image from the Dockerfile"
    for name in builders:
        build = SERVICES[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").resolve() == DOCKERFILE
    # Every app service must trigger that build: it builds itself or depends on a builder.
    for name in APP_SERVICES:
        assert name in builders or set(_depends_on(name)) & set(builders), f"{name} may run unbuilt"
    data_volumes = {
        str(v).split(":", 1)[0]
        for name in APP_SERVICES
        for v in SERVICES[name].get("volumes") or []
        if str(v).endswith(":/data")
    }
    assert len(data_volumes) == 1 and data_volumes <= set(COMPOSE.get("volumes") or {})


def test_no_stray_dollar_interpolation() -> None:
    # Compose interpolates `$`: variables are written `${VAR}` / `${VAR:-default}`, a literal dollar `$$`.
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("$$", "")
    assert not re.findall(r"\$(?!\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\})", text)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_non_root_and_runs_api() -> None:
    assert DOCKERFILE.is_file()
    instructions = _dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms and froms[-1].split()[0].startswith("python:3.11-slim")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":", 1)[0] not in {"root", "0"}
    launch = " ".join(args for keyword, args in instructions if keyword in {"CMD", "ENTRYPOINT"})
    assert "api.main:app" in launch
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "pip install" in runs
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    for needed in ("pyproject.toml", "salesdash", "api", "db", "worker"):
        assert needed in copied, f"Dockerfile must COPY {needed}"
