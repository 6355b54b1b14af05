"""Request and response hooks that apply to every route."""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import ClientException
from litestar.routes import HTTPRoute
from litestar.types import Message, Scope

from app.api.auth import PUBLIC_PATHS


async def allow_every_method(message: Message, scope: Scope) -> None:
    """OPTIONS lists every method of the path, not only the first handler's.

    Litestar 2 answers OPTIONS from the route its first handler on a path made
    (litestar#4169, fixed in Litestar 3); the app's routes know all the methods.
    """
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    headers = MutableScopeHeaders.from_message(message)
    if "allow" not in headers:
        return
    for route in scope["litestar_app"].routes:
        if isinstance(route, HTTPRoute) and route.path_format == scope.get("path_template"):
            headers["allow"] = ", ".join(sorted(route.methods))
            return


async def refuse_repeated_parameters(request: Request[Any, Any, Any]) -> None:
    """A query parameter given twice is a 400: each of ours takes one value.

    Litestar would quietly keep the last one, so `?limit=1&limit=100` meant 100.
    (Async on purpose: Litestar hands a synchronous hook to a worker thread per request.)
    """
    if any(re.match(pattern, request.url.path) for pattern in PUBLIC_PATHS):
        return
    for name, values in request.query_params.dict().items():
        if len(values) > 1:
            raise ClientException(
                f"invalid request: the query parameter {name!r} is given {len(values)} times; "
                "give it once",
                extra={"field": name},
            )
