"""GET /metrics: the process's Prometheus metrics (no key; no job or client ids in them)."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State

from app.api.jobs import services_of
from app.metrics import CONTENT_TYPE

# Litestar adds the charset to a text/* media type itself.
_MEDIA_TYPE = CONTENT_TYPE.removesuffix("; charset=utf-8")


@get(
    "/metrics",
    media_type=_MEDIA_TYPE,
    # For Prometheus, not API clients: docs/operations.md lists every metric.
    include_in_schema=False,
)
async def prometheus_metrics(state: State) -> Response[bytes]:
    """Answer a scrape, even while PostgreSQL or NATS is down (their metrics then say so)."""
    body = await services_of(state).metrics.exposition()
    return Response(body, media_type=_MEDIA_TYPE)
