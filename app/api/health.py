"""GET /healthz: 200 once the API reaches PostgreSQL and NATS, 503 otherwise."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from app.api.errors import LedgerResponse
from app.api.jobs import services_of
from app.api.schemas import HealthResponse
from app.services import database_reachable


@get(
    "/healthz",
    tags=["operations"],
    summary="Health",
    responses={503: ResponseSpec(HealthResponse, description="a dependency is unreachable")},
)
async def healthz(state: State) -> Response[HealthResponse]:
    """Check both dependencies on every call; load balancers should poll this."""
    services = services_of(state)
    postgres = await database_reachable(services.pool)
    nats = services.bus.is_connected
    healthy = postgres and nats
    body = HealthResponse(status="ok" if healthy else "unavailable", postgres=postgres, nats=nats)
    return LedgerResponse(body, status_code=200 if healthy else 503)


__all__: list[Any] = ["healthz"]
