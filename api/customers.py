"""Customer intelligence over REST (docs/rest.md#customers): the lifetime-value model now in use. Thin: read through
db.queries.lifetime_values, shape the answer."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException

from api.deps import DbDep, ReadDep
from api.errors import error_responses
from db.queries.lifetime_values import HORIZON_DAYS, LifetimeValueModel, latest_model

router = APIRouter(tags=["customers"])


class LifetimeValueModelView(LifetimeValueModel):
    """The fit saved last: what every customer's predicted value comes from."""

    time_unit: Literal["day"] = "day"  # α is per day; x, t_x and T were counted in local days
    horizon_days: int = HORIZON_DAYS  # predicted_ltv_12m and expected_purchases_12m cover this many days


@router.get(
    "/customers/lifetime-value-model",
    response_model=LifetimeValueModelView,
    responses=error_responses(401, 403, 404),
)
async def lifetime_value_model(db: DbDep, _: ReadDep) -> LifetimeValueModelView:
    model = await latest_model(db)
    if model is None:
        raise HTTPException(
            404, detail="no lifetime-value model has been fitted yet (update_customer_lifetime_values fits one)"
        )
    return LifetimeValueModelView(**model.model_dump())
