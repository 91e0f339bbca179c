"""Who may do what (docs/rest.md#auth): scopes read ⊂ trigger ⊂ admin, the principal an API call or CLI command acts
as, and the one check every job operation makes.

This is the foundation package, so it imports nothing else from the project: the registry, the job service, the
API and the CLI all build on it. How a principal is obtained (a token looked up in PostgreSQL, or the operator's
own machine credentials) is the transport's business; what it may do is decided only here and in the job service.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Final


class Scope(StrEnum):
    READ = "read"
    TRIGGER = "trigger"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in read ⊂ trigger ⊂ admin: a larger scope includes every smaller one."""
        return _RANK[self]


_RANK: Final[dict[Scope, int]] = {Scope.READ: 0, Scope.TRIGGER: 1, Scope.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """Whoever a call acts for; `scopes` is what its credential was granted, `token_id` the API token it came
    with (None for the operator), which rate limits and idempotency keys are counted per."""

    scopes: frozenset[Scope]
    token_id: int | None = None

    @classmethod
    def of(cls, names: Iterable[str], token_id: int | None = None) -> Principal:
        """From stored scope names; a name this code does not know grants nothing (fail closed, never crash)."""
        known = {s.value for s in Scope}
        return cls(frozenset(Scope(n) for n in names if n in known), token_id)

    def allows(self, needed: Scope) -> bool:
        return any(s.rank >= needed.rank for s in self.scopes)


class AuthError(Exception):
    """Refused for lack of credentials or scope; carries how each transport reports it."""

    status_code: ClassVar[int]
    code: ClassVar[str]


class UnauthenticatedError(AuthError):
    status_code = 401
    code = "UNAUTHENTICATED"


class ForbiddenError(AuthError):
    status_code = 403
    code = "FORBIDDEN"


def require(principal: Principal, needed: Scope) -> None:
    if not principal.allows(needed):
        raise ForbiddenError(f"this needs the {needed.value!r} scope")


def scope_to_operate(task_scope: Scope | None) -> Scope:
    """The scope needed to enqueue, abort, retry a job of a task with `task_scope`: at least trigger (read only
    looks), more when the task asks for it; admin when the task is no longer known, since nothing then says
    how dangerous the job is."""
    if task_scope is None:
        return Scope.ADMIN
    return max(task_scope, Scope.TRIGGER, key=lambda s: s.rank)


# The `salesdash` CLI runs with the machine's own database and Redis credentials, so it could do anything anyway;
# it acts as admin but still goes through `require`, so every operation has one code path and one rule.
OPERATOR: Final[Principal] = Principal(frozenset({Scope.ADMIN}))
