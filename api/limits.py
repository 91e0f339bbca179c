"""Cost limits, checked before a request is parsed or executed (docs/configuration.md#api-limits): the size of a
request body (declared or streamed), and for GraphQL the size of the query, its tokens, aliases, depth and
fields. Every limit is a setting; a request over one is refused with a message naming the limit."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from graphql import (
    ASTValidationRule,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    NoSchemaIntrospectionCustomRule,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
)
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter

from api.errors import error_response
from salesdash.config import get_settings


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: larger than {limit} bytes (SALESDASH_API_MAX_BODY_BYTES)")


class BodyLimit:
    """ASGI middleware: a body whose Content-Length is over the limit is refused before any of it is read; a body
    sent without one (chunked) is refused as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = get_settings().api_max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "Content-Length: not a number of bytes")(scope, receive, send)
                return
            if int(declared) > limit:
                await error_response(413, BodyTooLargeError(limit).detail)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)  # an HTTPException: the route's handler answers 413
            return message

        await self.app(scope, limited_receive, send)


# ---- GraphQL ---------------------------------------------------------------------------------------------------
def check_query_size(query: str | None) -> None:
    """Refuses a query text over the limit, before it is parsed."""
    limit = get_settings().graphql_max_query_bytes
    size = len((query or "").encode())
    if size > limit:
        raise GraphQLError(
            f"query: {size} bytes, over the limit of {limit} (SALESDASH_GRAPHQL_MAX_QUERY_BYTES)",
            extensions={"code": "QUERY_TOO_LARGE"},
        )


# `ofType` (introspection's chain from a wrapper type to the type it wraps) is linear: one object per level, however
# deep, so it counts toward neither the fields nor the depth of a query. GraphiQL's introspection query stays in.
_LINEAR = "ofType"


def count_fields(selections: SelectionSetNode | None, fragments: Mapping[str, FragmentDefinitionNode]) -> int:
    """Fields an operation selects, with every fragment spread counted where it is spread (a fragment spread
    twice costs twice). Fragment cycles are refused by GraphQL's own validation; `seen` keeps this finite."""

    def walk(node: SelectionSetNode | None, seen: frozenset[str]) -> int:
        total = 0
        for selection in node.selections if node else ():
            if isinstance(selection, FieldNode) and selection.name.value != _LINEAR:
                total += 1 + walk(selection.selection_set, seen)
            elif isinstance(selection, InlineFragmentNode):
                total += walk(selection.selection_set, seen)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                fragment = fragments.get(selection.name.value)
                if fragment is not None:
                    total += walk(fragment.selection_set, seen | {selection.name.value})
        return total

    return walk(selections, frozenset())


def introspection_depth(selections: SelectionSetNode | None, fragments: Mapping[str, FragmentDefinitionNode]) -> int:
    """How deep the `__schema` and `__type` parts of an operation go (strawberry's QueryDepthLimiter skips them,
    yet `types { fields { type { fields … } } }` fans out at every level)."""

    def depth(node: SelectionSetNode | None, seen: frozenset[str], inside: bool) -> int:
        deepest = 0
        for selection in node.selections if node else ():
            if isinstance(selection, FieldNode) and selection.name.value != _LINEAR:
                entered = inside or selection.name.value in ("__schema", "__type")
                below = depth(selection.selection_set, seen, entered)
                deepest = max(deepest, below + 1 if entered else below)
            elif isinstance(selection, InlineFragmentNode):
                deepest = max(deepest, depth(selection.selection_set, seen, inside))
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                fragment = fragments.get(selection.name.value)
                if fragment is not None:
                    deepest = max(deepest, depth(fragment.selection_set, seen | {selection.name.value}, inside))
        return deepest

    return depth(selections, frozenset(), False)


def cost_problems(
    operation: OperationDefinitionNode, fragments: Mapping[str, FragmentDefinitionNode], max_fields: int, max_depth: int
) -> list[str]:
    problems = []
    fields = count_fields(operation.selection_set, fragments)
    if fields > max_fields:
        problems.append(f"{fields} fields selected, over the limit of {max_fields} (SALESDASH_GRAPHQL_MAX_FIELDS)")
    depth = introspection_depth(operation.selection_set, fragments)
    if depth > max_depth:
        problems.append(
            f"introspection {depth} levels deep, over the limit of {max_depth} (SALESDASH_GRAPHQL_MAX_DEPTH)"
        )
    return problems


def cost_rule(max_fields: int, max_depth: int) -> type[ValidationRule]:
    class CostRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            definitions = context.document.definitions
            fragments = {d.name.value: d for d in definitions if isinstance(d, FragmentDefinitionNode)}
            for operation in definitions:
                if isinstance(operation, OperationDefinitionNode):
                    for problem in cost_problems(operation, fragments, max_fields, max_depth):
                        context.report_error(GraphQLError(problem, extensions={"code": "QUERY_TOO_COMPLEX"}))

    return CostRule


@functools.lru_cache
def _validation_rules(
    max_aliases: int, max_depth: int, max_fields: int, introspection: bool
) -> tuple[type[ASTValidationRule], ...]:
    # made once per set of limits: the same classes every request, so that the validation of a repeated operation
    # is found in api.graphql_rules' cache
    return (
        *MaxAliasesLimiter(max_alias_count=max_aliases).validation_rules,
        *QueryDepthLimiter(max_depth=max_depth).validation_rules,
        cost_rule(max_fields, max_depth),
        *(() if introspection else (NoSchemaIntrospectionCustomRule,)),
    )


def validation_rules(introspection: bool) -> tuple[type[ASTValidationRule], ...]:
    """Aliases, depth (strawberry's limiters), fields and introspection depth (cost_rule), from the settings; and
    no introspection at all when it is switched off."""
    settings = get_settings()
    limits = (settings.graphql_max_aliases, settings.graphql_max_depth, settings.graphql_max_fields)
    return _validation_rules(*limits, introspection)
