"""The rules every GraphQL request is held to, whichever way it is executed (strawberry's, with RequestRules as
its one extension, or api.graphql_direct's): the limits (api.limits), parsing and validation cached per query text
and rule set, introspection for token holders, and unexpected exceptions masked (docs/graphql.md#errors)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import strawberry
from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    GraphQLError,
    GraphQLSchema,
    Visitor,
    parse,
    specified_rules,
    visit,
)
from strawberry.extensions import SchemaExtension
from strawberry.schema.schema import validate_document
from strawberry.types import ExecutionContext

from api.errors import DEPENDENCY_NAMES, log_unexpected, request_id, unreachable_dependency
from api.limits import check_query_size, validation_rules
from salesdash.auth import Scope
from salesdash.config import get_settings


def unexpected(error: GraphQLError) -> bool:
    """An exception a resolver did not mean to raise (a GraphQLError it raised, a syntax, validation or variable
    error names the problem and is shown as it is)."""
    return error.path is not None and not isinstance(error.original_error, GraphQLError | None)


def masked(errors: list[GraphQLError]) -> list[GraphQLError]:
    """Unexpected exceptions as a generic message with a code and the request id under which the server logged
    the detail; the others as they are."""
    return [_masked(e) if unexpected(e) else e for e in errors]


def _masked(error: GraphQLError) -> GraphQLError:
    original = error.original_error
    dependency = unreachable_dependency(original) if original else None
    if dependency is not None:
        message, extensions = f"{DEPENDENCY_NAMES[dependency]} is unreachable", {"code": "UNAVAILABLE"}
    else:
        rid = request_id.get()
        message, extensions = f"internal error (request id {rid})", {"code": "INTERNAL_SERVER_ERROR", "requestId": rid}
    return GraphQLError(message, error.nodes, path=error.path, original_error=original, extensions=extensions)


def log_errors(errors: list[GraphQLError]) -> None:
    """Logs only what the client is not told: unexpected exceptions, with their traceback and request id (a
    refused token or a bad argument is the caller's business, not the log's)."""
    for error in errors:
        original = error.original_error
        if unexpected(error) and original is not None and unreachable_dependency(original) is None:
            log_unexpected(original, f"GraphQL field {'.'.join(map(str, error.path or []))}")


class Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        log_errors(errors)


@functools.lru_cache(maxsize=256)
def asks_for_the_schema(document: DocumentNode) -> bool:
    """Whether an operation reads `__schema` or `__type` (`__typename` is harmless)."""
    asked = False

    class Finder(Visitor):
        def enter_field(self, node: FieldNode, *_: Any) -> None:
            nonlocal asked
            asked = asked or node.name.value in ("__schema", "__type")

    visit(document, Finder())
    return asked


def parsed(query: str) -> DocumentNode:
    """The query over the size limit refused, then parsed within the token limit (GraphQLError naming the
    problem); the same text parses to the same document object, which the caches recognise."""
    check_query_size(query)
    return _parsed(query, get_settings().graphql_max_tokens)


@functools.lru_cache(maxsize=256)
def _parsed(query: str, max_tokens: int) -> DocumentNode:
    return parse(query, max_tokens=max_tokens)


def rules(introspection: bool) -> tuple[type[ASTValidationRule], ...]:
    """GraphQL's own validation rules and the limits' (no introspection at all when it is switched off)."""
    return (*specified_rules, *validation_rules(introspection))


@functools.lru_cache(maxsize=256)
def validation_errors(
    schema: GraphQLSchema, document: DocumentNode, rules: tuple[type[ASTValidationRule], ...]
) -> list[GraphQLError]:
    return validate_document(schema, document, rules)


class RequestRules(SchemaExtension):
    """The rules as strawberry's one extension (strawberry enters and leaves each extension's hooks on every
    request: seven extensions, one per rule, cost as much CPU as executing a trigger; bench/api.py)."""

    def __init__(self, introspection: bool) -> None:
        self.introspection = introspection

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        check_query_size(context.query)
        context.validation_rules = rules(self.introspection)
        yield
        result = context.result
        if result is not None and result.errors:
            result.errors = masked(result.errors)

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.query is not None:
            context.graphql_document = parsed(context.query)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        assert context.graphql_document is not None  # parsed, or strawberry stops before validating
        context.pre_execution_errors = validation_errors(
            context.schema._schema, context.graphql_document, tuple(context.validation_rules)
        )
        yield

    async def on_execute(self) -> AsyncIterator[None]:
        document = self.execution_context.graphql_document
        if document is not None and asks_for_the_schema(document):
            await self.execution_context.context.require(Scope.READ)
        yield
