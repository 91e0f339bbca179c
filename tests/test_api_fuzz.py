"""Schemathesis against the running API (issue 10, point 7): every operation of /openapi.json, with valid and
invalid input, must answer a status, content type, headers and body its OpenAPI entry documents, never a 5xx;
every GraphQL query and mutation must answer a GraphQL response without a server or internal error. No job is
enqueued but by an accepted trigger (the jobs in Redis afterwards are exactly the accepted ones).

Bounded for `make test`: derandomized (the same cases each run) and SALESDASH_FUZZ_EXAMPLES examples per
operation and mode (default 150: positive + negative = 300 per REST operation, 150 per GraphQL field, about 50 s
on an idle 2-core machine); raise it for a deeper run."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from redis.asyncio import Redis
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_server import api_server
from tests.test_api import queue_snapshot
from worker import jobstore as js

EXAMPLES = int(os.environ.get("SALESDASH_FUZZ_EXAMPLES", "150"))
OPENAPI_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzz(operations: Any, examples: int, modes: list[GenerationMode], per_case: Callable[[Case], None]) -> int:
    """Run `per_case` on `examples` generated cases of every operation in each mode; returns how many ran."""
    ran = 0
    for result in operations:
        operation = result.ok()
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:  # the schema's examples too (valid task names, so some are enqueued)
                strategy = st.one_of(strategy, *operation.get_strategies_from_examples())

            @given(case=strategy)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Case) -> None:
                nonlocal ran
                ran += 1
                per_case(case)

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE, operation.label
    return ran


def fuzz_openapi(base: str, token: str) -> tuple[int, set[str]]:
    """Every REST operation; returns the cases run and the ids of the jobs the API said it accepted."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    accepted: set[str] = set()
    session = requests.Session()  # one kept-alive connection, not one per case

    def check(case: Case) -> None:
        response = case.call_and_validate(
            base_url=base,
            session=session,
            headers={"Authorization": f"Bearer {token}"},
            checks=OPENAPI_CHECKS,
            timeout=30,
        )
        if response.status_code == 202:  # POST /jobs, POST /jobs/{id}/retry
            accepted.add(response.json()["task_id"])

    ran = fuzz(schema.get_all_operations(), EXAMPLES, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], check)
    return ran, accepted


def fuzz_graphql(base: str, token: str) -> int:
    """Every GraphQL field, with a read token: queries run, every mutation is refused before it does anything."""
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.graphql.from_url(f"{base}/graphql", headers=headers)
    session = requests.Session()

    def check(case: Case) -> None:
        response = case.call(base_url=base, session=session, headers=headers, timeout=30)
        assert response.status_code == 200, (case.body, response.text)
        body = response.json()
        assert set(body) <= {"data", "errors", "extensions"} and ("data" in body or "errors" in body), body
        for error in body.get("errors", ()):
            assert isinstance(error["message"], str), error
            code = error.get("extensions", {}).get("code")
            assert code not in ("INTERNAL_SERVER_ERROR", "UNAVAILABLE"), (case.body, error)

    return fuzz(schema.get_all_operations(), EXAMPLES, [GenerationMode.POSITIVE], check)


async def test_openapi_and_graphql_fuzzing_finds_no_server_error_and_no_schema_violation(
    tokens: dict[str, str], clean_redis: Redis
) -> None:
    async with api_server(env={"SALESDASH_TRIGGER_RATE_PER_MINUTE": "0"}) as base:
        before = await queue_snapshot(clean_redis)
        graphql_cases = await asyncio.to_thread(fuzz_graphql, base, tokens["read"])
        assert await queue_snapshot(clean_redis) == before  # a read token triggers, aborts, purges nothing
        rest_cases, accepted = await asyncio.to_thread(fuzz_openapi, base, tokens["trigger"])
    assert graphql_cases >= 10 * EXAMPLES // 2 and rest_cases >= 15 * EXAMPLES, (graphql_cases, rest_cases)
    in_redis = {key.decode().removeprefix(js.job_key("")) for key in await clean_redis.keys(js.job_key("*"))}
    assert accepted, "no trigger was accepted: the fuzzing never reached the enqueue path"
    assert in_redis == accepted
