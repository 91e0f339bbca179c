"""api.graphql_direct: a plain GraphQL request executed by graphql-core directly answers exactly what strawberry's
view answers (the same requests sent both ways), and the requests that are not plain still go to strawberry."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from strawberry.types import ExecutionResult as StrawberryResult

from api import graphql_direct
from tests.test_api import queue_snapshot

TRIGGER = (
    'mutation { triggerBackgroundTask(taskName: "refresh_all_materialized_views") { success taskId queue message } }'
)
TRIGGER_WITH = """mutation($name: String!, $priority: Int) {
  triggerBackgroundTask(taskName: $name, priority: $priority) { success taskId message } }"""
TWO_OPERATIONS = "query Tasks { backgroundTasks { name queue scope } } query Type { __typename }"

# (token scope, body): every body is a JSON object as client libraries send it
CASES: list[tuple[str, dict[str, Any]]] = [
    ("trigger", {"query": TRIGGER}),
    ("read", {"query": TRIGGER}),  # FORBIDDEN, from the resolver
    ("trigger", {"query": TRIGGER_WITH, "variables": {"name": "no_such_task"}}),  # success false, named
    ("trigger", {"query": TRIGGER_WITH, "variables": {"name": "refresh_all_materialized_views", "priority": 99}}),
    ("trigger", {"query": TRIGGER_WITH, "variables": {"name": "refresh_all_materialized_views", "priority": "high"}}),
    ("trigger", {"query": TRIGGER_WITH, "variables": None}),  # a required variable missing
    ("read", {"query": TWO_OPERATIONS, "operationName": "Tasks"}),
    ("read", {"query": TWO_OPERATIONS, "operationName": "Type", "variables": {}}),
    ("read", {"query": '{ taskStatus(taskId: "no-such-job") { status } }'}),
    ("read", {"query": "{ __schema { queryType { name } mutationType { name } } }"}),
    ("admin", {"query": 'mutation { purgeQueue(queue: "no_such_queue") { success message removed } }'}),
]
# not plain: strawberry's view answers them, with or without the direct path
NOT_PLAIN: list[tuple[str, dict[str, Any]]] = [
    ("read", {"query": "{ noSuchField }"}),  # a validation error
    ("read", {"query": "{ backgroundTasks { name "}),  # a syntax error
    ("read", {"query": TWO_OPERATIONS}),  # which operation?
    ("read", {"query": TWO_OPERATIONS, "operationName": "NoSuchOperation"}),
    ("read", {"query": "{ __typename }", "extensions": {"persistedQuery": {"version": 1}}}),
    ("read", {"query": "{ __typename }", "variables": []}),  # not an object: strawberry's 400
]
_TASK_ID = re.compile(r'"taskId":\s*"[0-9a-f]{32}"')


async def _answers(client: httpx.AsyncClient, auth: dict[str, dict[str, str]], direct: bool) -> list[tuple[int, str]]:
    answers = []
    graphql_direct.ENABLED = direct
    try:
        for scope, body in CASES + NOT_PLAIN:
            response = await client.post("/graphql", json=body, headers=auth[scope])
            answers.append((response.status_code, _TASK_ID.sub('"taskId": "…"', response.text)))
    finally:
        graphql_direct.ENABLED = True
    return answers


async def test_the_direct_path_answers_what_strawberry_answers(
    clean_redis: Redis, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[bool] = []
    execute_plain = graphql_direct.execute_plain

    async def counted(*args: Any, **kwargs: Any) -> StrawberryResult | None:
        result = await execute_plain(*args, **kwargs)
        answered.append(result is not None)
        return result

    monkeypatch.setattr(graphql_direct, "execute_plain", counted)
    strawberrys = await _answers(app_client, auth, direct=False)
    assert answered == []
    direct = await _answers(app_client, auth, direct=True)
    assert direct == strawberrys
    # every plain request was answered directly, every other one by strawberry
    assert answered == [True] * len(CASES) + [False] * len(NOT_PLAIN)
    # and they answered something: a job enqueued, refusals and errors named
    assert '"success": true' in direct[0][1].replace('":true', '": true') and "FORBIDDEN" in direct[1][1]
    assert "no_such_task" in direct[2][1] and "priority" in direct[3][1] and '"errors"' in direct[4][1]


async def test_a_direct_trigger_enqueues_once_and_a_refused_one_never(
    clean_redis: Redis, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    before = await queue_snapshot(clean_redis)
    refused = await app_client.post("/graphql", json={"query": TRIGGER}, headers=auth["read"])
    assert refused.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert await queue_snapshot(clean_redis) == before
    done = (await app_client.post("/graphql", json={"query": TRIGGER}, headers=auth["trigger"])).json()
    assert done["data"]["triggerBackgroundTask"]["success"] is True
    counts, jobs = await queue_snapshot(clean_redis)
    assert jobs == before[1] + 1
