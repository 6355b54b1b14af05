"""The HTTP API application: `create_app(settings)` is its composition root."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler

from app.api import openapi
from app.api.admin import AdminController
from app.api.attempts import AttemptController
from app.api.audit import AuditController
from app.api.auth import ApiKeyMiddleware
from app.api.availability import DatabaseGateMiddleware
from app.api.errors import EXCEPTION_HANDLERS, LedgerResponse
from app.api.files import FileController
from app.api.health import healthz
from app.api.hooks import allow_every_method, refuse_repeated_parameters
from app.api.jobs import JobController
from app.api.metrics import prometheus_metrics
from app.api.miners import MinerController
from app.api.observability import BindPathIds, RequestObserver
from app.api.throughput import ThroughputController
from app.api.ui import ui_router
from app.api.watch import WatchController
from app.config import Settings
from app.services import open_services


def create_app(settings: Settings) -> Litestar:
    """The API with its services opened in the lifespan and closed in reverse on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_services(settings) as services:
            app.state.services = services
            yield

    client_api_served = settings.role != "workers"
    client_api: list[ControllerRouterHandler] = [
        JobController,
        WatchController,
        ThroughputController,
        AttemptController,
        FileController,
        AuditController,
        MinerController,
        AdminController,
        ui_router(),
    ]
    app = Litestar(
        # A "workers" process answers health checks (and scrapes) only.
        route_handlers=[
            *(client_api if client_api_served else []),
            healthz,
            prometheus_metrics,
        ],
        lifespan=[lifespan],
        # The gate first: while PostgreSQL is down, not even the key lookup waits on it.
        middleware=[BindPathIds(), DatabaseGateMiddleware(), ApiKeyMiddleware()],
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=refuse_repeated_parameters,
        before_send=[allow_every_method],
        response_class=LedgerResponse,
        request_max_body_size=settings.max_json_body_bytes,
        plugins=[openapi.DecimalAsNumber(), openapi.StrictStructs()],
        openapi_config=OpenAPIConfig(
            title="jobledger",
            version="1.0.0",
            description=(
                "An event-sourced ledger for GPU compute jobs. Send an API key as "
                "`X-Api-Key: <key>` or `Authorization: Bearer <key>` (with both, only "
                "`X-Api-Key` is read). Every authenticated "
                "answer carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and "
                "`X-RateLimit-Reset` (unix seconds) for the key's binding window; a 429 "
                'adds `Retry-After`. Errors are `{"error": {status, message, details}}`.'
            ),
            path="/schema",
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(
                        type="apiKey", name="X-Api-Key", security_scheme_in="header"
                    ),
                    "bearer": SecurityScheme(type="http", scheme="bearer"),
                }
            ),
            security=[{"apiKey": []}, {"bearer": []}],
        ),
        # Logging is configured once by the process (the CLI), not by the framework.
        logging_config=None,
        debug=False,
    )
    # Litestar builds the document once, when first asked, and serves that one object.
    if client_api_served:
        openapi.complete(app.openapi_schema)
    # Outside routing and error handling: every answer gets X-Request-Id and is counted.
    app.asgi_handler = RequestObserver(app.asgi_handler)
    return app


class LedgerServer(uvicorn.Server):
    """uvicorn's server, which first ends the app's watch streams when it shuts down.

    uvicorn waits for every open response before it runs the lifespan's shutdown, and
    the watch of a job that is still running never ends by itself: without this, one
    open watch would hold a stopping server until it is killed. The watchers' clients
    reconnect with Last-Event-ID.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the watch streams, then shut down as uvicorn does."""
        app = self.config.app
        services = getattr(app.state, "services", None) if isinstance(app, Litestar) else None
        if services is not None:
            services.watches.end_streams()
        await super().shutdown(sockets)
