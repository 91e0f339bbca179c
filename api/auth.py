"""Bearer-token auth with scopes read ⊂ trigger ⊂ admin (CONTRACT §6)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from db.queries.tokens import scopes_for
from worker.registry import Scope

_RANK = {Scope.READ: 0, Scope.TRIGGER: 1, Scope.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    scopes: frozenset[str]

    def allows(self, needed: Scope) -> bool:
        return any(_RANK[Scope(s)] >= _RANK[needed] for s in self.scopes)


class AuthError(Exception):
    def __init__(self, message: str, status_code: int, code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


async def authenticate(db: asyncpg.Pool, authorization: str | None) -> Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("missing bearer token (Authorization: Bearer <token>)", 401, "UNAUTHENTICATED")
    scopes = await scopes_for(db, authorization[7:].strip())
    if scopes is None:
        raise AuthError("invalid or revoked token", 401, "UNAUTHENTICATED")
    return Principal(frozenset(scopes))


def require(principal: Principal, needed: Scope) -> None:
    if not principal.allows(needed):
        raise AuthError(f"this needs the {needed.value!r} scope", 403, "FORBIDDEN")
