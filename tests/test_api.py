"""API transport: auth, validation before enqueue, status codes."""

from __future__ import annotations

from typing import Any

import httpx
from redis.asyncio import Redis

from worker import jobstore
from worker.registry import Queue

TRIGGER = """mutation($name: String!, $args: JSON, $kwargs: JSON, $priority: Int!) {
  triggerBackgroundTask(taskName: $name, args: $args, kwargs: $kwargs, priority: $priority) {
    success taskId message queue } }"""


async def gql(
    client: httpx.AsyncClient, query: str, headers: dict[str, str] | None = None, **variables: Any
) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


async def queue_snapshot(redis: Redis) -> tuple[dict[str, dict[str, int]], int]:
    counts = {q.value: await jobstore.queue_counts(redis, q.value) for q in Queue}
    return counts, len(await redis.keys(jobstore.job_key("*")))  # the payloads of live jobs


async def test_unknown_task_is_refused_and_nothing_is_enqueued(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    before = await queue_snapshot(clean_redis)
    body = await gql(app_client, TRIGGER, auth["trigger"], name="refresh_everything_please", priority=5)
    result = body["data"]["triggerBackgroundTask"]
    assert result["success"] is False and result["taskId"] is None
    assert "refresh_everything_please" in result["message"]
    assert await queue_snapshot(clean_redis) == before


async def test_bad_arguments_are_refused_before_enqueue(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    before = await queue_snapshot(clean_redis)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kwargs": {"surprise": 1}}, "surprise"),
        ({"args": [1]}, "positional"),
        ({"priority": 12}, "priority"),
    ]
    for variables, fragment in cases:
        merged: dict[str, Any] = {"priority": 5, **variables}
        body = await gql(app_client, TRIGGER, auth["trigger"], name="refresh_all_materialized_views", **merged)
        result = body["data"]["triggerBackgroundTask"]
        assert result["success"] is False, variables
        assert fragment in result["message"], (fragment, result["message"])
    assert await queue_snapshot(clean_redis) == before


async def test_trigger_enqueues_on_the_task_queue(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    body = await gql(app_client, TRIGGER, auth["trigger"], name="refresh_all_materialized_views", priority=7)
    result = body["data"]["triggerBackgroundTask"]
    assert result["success"] is True and result["queue"] == "analytics"
    status = await app_client.get(f"/jobs/{result['taskId']}", headers=auth["read"])
    assert status.status_code == 200
    assert status.json()["status"] == "queued" and status.json()["priority"] == 7
    assert (await jobstore.queue_counts(clean_redis, "analytics"))["queued"] == 1


async def test_auth_is_required_with_the_right_scope(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    assert (await app_client.get("/jobs")).status_code == 401
    assert (await app_client.get("/jobs", headers={"Authorization": "Bearer nope"})).status_code == 401
    denied = await app_client.post("/jobs", json={"task_name": "refresh_all_materialized_views"}, headers=auth["read"])
    assert denied.status_code == 403
    body = await gql(app_client, TRIGGER, None, name="refresh_all_materialized_views", priority=5)
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    body = await gql(app_client, TRIGGER, auth["read"], name="refresh_all_materialized_views", priority=5)
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert (await app_client.get(open_path)).status_code == 200, open_path


async def test_rest_enqueue_validation_and_unknown_ids(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    ok = await app_client.post(
        "/jobs", json={"task_name": "check_low_stock_products", "priority": 9}, headers=auth["trigger"]
    )
    assert ok.status_code == 202 and ok.json()["queue"] == "notifications"
    for bad, fragment in [
        ({"task_name": "nope"}, "unknown task"),
        ({"task_name": "check_low_stock_products", "priority": -1}, "priority"),
        ({"task_name": "check_low_stock_products", "defer_seconds": -5}, "defer_seconds"),
    ]:
        response = await app_client.post("/jobs", json=bad, headers=auth["trigger"])
        assert response.status_code == 422 and fragment in response.text, bad
    missing = await app_client.get("/jobs/0123456789abcdef", headers=auth["read"])
    assert missing.status_code == 404
    body = await gql(app_client, 'query { taskStatus(taskId: "0123") { status } }', auth["read"])
    assert body["data"]["taskStatus"] is None
    assert (await app_client.get("/jobs?status=bogus", headers=auth["read"])).status_code == 422


async def test_background_tasks_lists_the_registry(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    body = await gql(app_client, "query { backgroundTasks { name queue schedule } }", auth["read"])
    tasks = {t["name"]: t for t in body["data"]["backgroundTasks"]}
    assert tasks["refresh_realtime_materialized_views"]["queue"] == "analytics"
    assert tasks["refresh_all_materialized_views"]["schedule"] == "on demand"


async def test_dashboard_page_shows_queues_and_jobs(
    app_client: httpx.AsyncClient, clean_redis: Redis, tokens: dict[str, str], auth: dict[str, dict[str, str]]
) -> None:
    job = await app_client.post("/jobs", json={"task_name": "refresh_all_materialized_views"}, headers=auth["trigger"])
    anonymous = await app_client.get("/dashboard")
    assert anonymous.status_code == 401 and "API token" in anonymous.text
    page = await app_client.get("/dashboard", headers=auth["read"])
    assert page.status_code == 200 and "analytics" in page.text
    listed = (await app_client.get("/dashboard/api/jobs", headers=auth["read"])).json()["jobs"]
    assert [row["status"]["status"] for row in listed if row["status"]["task_id"] == job.json()["task_id"]] == [
        "queued"
    ]
    login = await app_client.post("/dashboard/login", data={"token": tokens["read"]})
    assert login.status_code == 303 and "salesdash_session" in login.headers["set-cookie"]
    assert tokens["read"] not in login.headers["set-cookie"]  # a server-side session, not the token (test_sessions)
    app_client.cookies.set("salesdash_session", login.cookies["salesdash_session"])
    try:
        with_cookie = await app_client.get("/dashboard")
    finally:
        app_client.cookies.clear()
    assert with_cookie.status_code == 200 and 'id="jobs"' in with_cookie.text
