"""Request ids and HTTP metrics for every request, and the ids of the job or miner it is about.

`RequestObserver` wraps the whole application (outside Litestar's routing and exception
handling), so every answer, a 401, 404 or 429 included, carries `X-Request-Id` and is
counted. `BindPathIds` runs after routing and binds the `job_id` / `miner_id` path
parameters for the request's log lines.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import bind_log_ids, log_context

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's id is kept if it is a plain token (a UUID, a ULID, a trace id); else we make one.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/@-]{0,127}")
# Where the request's arrival time (time.perf_counter()) is kept in the connection state.
ARRIVED_AT = "jobledger_arrived_at"


def accepted_request_id(presented: str | None) -> str:
    """The caller's X-Request-Id if it is a sane token, else a fresh random one."""
    if presented is not None and _SANE_REQUEST_ID.fullmatch(presented):
        return presented
    return secrets.token_hex(16)


def seconds_since_arrival(scope: Scope | dict[str, Any]) -> float | None:
    """How long ago the request arrived, if the observer saw it arrive (None otherwise)."""
    arrived = scope.get("state", {}).get(ARRIVED_AT)
    return time.perf_counter() - float(arrived) if arrived is not None else None


class RequestObserver:
    """Outermost ASGI layer: a request id per request, echoed and logged; HTTP metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with its id bound, and count it once its response is done."""
        if scope["type"] != ScopeType.HTTP:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})[ARRIVED_AT] = started
        request_id = accepted_request_id(MutableScopeHeaders(scope).get(REQUEST_ID_HEADER.lower()))
        status = 500  # what the server answers if the application fails before responding

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            with log_context(request_id=request_id):
                await self._app(scope, receive, send_with_id)
        finally:
            services = getattr(scope["litestar_app"].state, "services", None)
            if services is not None:
                services.metrics.observe_request(
                    scope["method"],
                    scope.get("path_template"),
                    status,
                    time.perf_counter() - started,
                )


class BindPathIds(ASGIMiddleware):
    """Binds the route's `job_id` and `miner_id` path parameters for the request's logs."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Bind for the rest of the request's task (error handlers outside us log them too)."""
        params = scope.get("path_params") or {}
        job_id, miner_id = params.get("job_id"), params.get("miner_id")
        bind_log_ids(
            job_id=job_id if isinstance(job_id, str) else None,
            miner_id=miner_id if isinstance(miner_id, str) else None,
        )
        await next_app(scope, receive, send)
