"""`GET /notifications` (docs/rest.md#notifications): the outbox, newest first, each notification with its deliveries
and their attempt history. Recipients are addresses and webhook names; no URL, password or secret is ever shown."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from api.deps import DbDep, ReadDep
from api.errors import error_responses
from db.queries import notifications as queries
from db.queries.notifications import KINDS, STATES, NotificationView

router = APIRouter(tags=["notifications"])


@router.get("/notifications", responses=error_responses(401, 403, 422))
async def list_notifications(
    db: DbDep,
    _: ReadDep,
    kind: Annotated[str | None, Query(description=f"one of {', '.join(KINDS)}")] = None,
    state: Annotated[str | None, Query(description=f"one of {', '.join(STATES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[NotificationView]:
    if kind is not None and kind not in KINDS:
        raise HTTPException(422, detail=f"kind: unknown notification kind {kind!r}; kinds: {', '.join(KINDS)}")
    if state is not None and state not in STATES:
        raise HTTPException(422, detail=f"state: unknown state {state!r}; states: {', '.join(STATES)}")
    return await queries.list_notifications(db, kind=kind, state=state, limit=limit)
