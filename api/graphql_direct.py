"""A plain GraphQL request executed by graphql-core directly, past strawberry's HTTP view and Schema.execute.

Plain: a POST whose Accept header asks for one JSON answer (or is absent) and whose body is a JSON object with a
string `query` and, optionally, `variables` (an object or null) and `operationName` (a string or null); its
document parses and validates (api.graphql_rules, both cached) to a query or a mutation, and reads introspection
only for a token holder. That is what client libraries send, and every trigger. Anything else (GET, GraphiQL,
batches, uploads, streamed answers, a document with errors, a refusal) goes to strawberry's view as before.

Why: strawberry's view and Schema.execute around graphql-core (the request adapter, an execution context, the
extension runner and its hooks, a middleware manager, the result conversion) cost about as much CPU as the rest of
a trigger through GraphQL (bench/api.py). What runs is the same: graphql-core's `execute` over strawberry's schema
and resolvers with strawberry's execution context class, the same rules, error logging and masking
(api.graphql_rules), and the same answer (the view's own process_result). tests/test_graphql_direct.py
sends the same requests both ways and compares the answers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import Any, TypeGuard, cast

import strawberry
from graphql import ExecutionResult, GraphQLError, OperationType, execute, get_operation_ast
from starlette.requests import Request
from strawberry.execution import optimized_is_awaitable
from strawberry.types import ExecutionResult as StrawberryResult

from api import graphql_rules as rules
from salesdash.auth import AuthError, Scope, require

ENABLED = True  # tests switch it off to have strawberry answer the same requests
_ONE_JSON_ANSWER = frozenset({None, "*/*", "application/json"})  # Accept headers
_FIELDS = frozenset({"query", "variables", "operationName"})


def may_be_plain(request: Request) -> bool:
    """What the headers tell, before the body is read."""
    content_type = request.headers.get("content-type", "")
    return (
        ENABLED
        and request.method == "POST"
        and content_type.split(";", 1)[0].strip() == "application/json"
        and request.headers.get("accept") in _ONE_JSON_ANSWER
    )


async def execute_plain(
    request: Request, schema: strawberry.Schema, introspection: bool, context: Any
) -> StrawberryResult | None:
    """The result of a plain request (context: the caller's, authenticated), errors logged and masked as strawberry
    would leave them; None when the request is not plain."""
    operation = await _plain_operation(request, schema, introspection)
    if operation is None:
        return None
    document, variables, operation_name = operation
    if rules.asks_for_the_schema(document):
        try:
            require(await context.authenticate(), Scope.READ)
        except AuthError:
            return None
    result = execute(
        schema._schema,
        document,
        root_value=None,
        context_value=context,
        variable_values=variables,
        operation_name=operation_name,
        is_awaitable=cast("Callable[[Any], TypeGuard[Awaitable[Any]]]", optimized_is_awaitable),
        executor_class=schema.execution_context_class,
        operation_extensions=None,
    )
    if isawaitable(result):
        result = await result
    assert isinstance(result, ExecutionResult)  # no @defer or @stream in this schema
    errors = list(result.errors or ())
    rules.log_errors(errors)
    return StrawberryResult(data=result.data, errors=rules.masked(errors) or None)


async def _plain_operation(
    request: Request, schema: strawberry.Schema, introspection: bool
) -> tuple[Any, dict[str, Any] | None, str | None] | None:
    try:
        data = json.loads(await request.body())
    except ValueError:
        return None
    if not isinstance(data, dict) or not data.keys() <= _FIELDS:
        return None
    query, variables, operation_name = data.get("query"), data.get("variables"), data.get("operationName")
    if not (isinstance(query, str) and isinstance(variables, dict | None) and isinstance(operation_name, str | None)):
        return None
    try:
        document = rules.parsed(query)
    except GraphQLError:
        return None
    if rules.validation_errors(schema._schema, document, rules.rules(introspection)):
        return None
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation not in (OperationType.QUERY, OperationType.MUTATION):
        return None
    return document, variables, operation_name
