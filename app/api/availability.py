"""Fail fast while PostgreSQL is down: a 503 at once instead of a request left waiting."""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from app.api.auth import PUBLIC_PATHS
from app.database_watch import DatabaseDown
from app.services import Services


class DatabaseGateMiddleware(ASGIMiddleware):
    """Refuse requests (503, `Retry-After`) while the database watch says PostgreSQL is down."""

    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = PUBLIC_PATHS

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        services: Services = scope["litestar_app"].state.services
        if not services.database.up:
            raise DatabaseDown("the ledger's database is unavailable; retry shortly")
        await next_app(scope, receive, send)
