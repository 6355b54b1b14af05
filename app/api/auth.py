"""Who is calling, and may they: API keys, per-key rate limits and role guards.

Every request outside the public paths must carry a key (`X-Api-Key: <key>` or
`Authorization: Bearer <key>`). The middleware authenticates it, counts it
against the key's limits (shared by all API processes through PostgreSQL) and
adds the X-RateLimit-* headers to the answer. Handlers then state which roles
may call them with `guards=[allow(...)]`.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.keys import Principal, Role
from app.logs import bind_log_ids
from app.ratelimit import RateLimitDecision
from app.services import Services

# The dashboard's pages and assets are public: its data comes from the API, with a key.
# /metrics is for Prometheus: counts only, no job, client or key ids (docs/operations.md).
PUBLIC_PATHS = ("^/healthz$", "^/metrics$", "^/schema", "^/ui(/|$)")


class TooManyRequests(HTTPException):
    """The key used up its budget for the current window."""

    status_code = 429


def presented_key(scope: Scope) -> str | None:
    """The key from X-Api-Key, or from an Authorization: Bearer header."""
    headers = MutableScopeHeaders(scope)
    key: str | None = headers.get("x-api-key")
    if key:
        return key.strip() or None
    authorization: str = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    headers = {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_epoch),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(decision.retry_after)
    return headers


class ApiKeyMiddleware(ASGIMiddleware):
    """Authenticate the key, apply its rate limit, and expose the caller as `request.user`."""

    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = PUBLIC_PATHS

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Reject unauthenticated or over-limit requests before they reach a handler."""
        services: Services = scope["litestar_app"].state.services
        key = presented_key(scope)
        if key is None:
            raise NotAuthorizedException(
                "missing API key: send it as 'X-Api-Key: <key>' or 'Authorization: Bearer <key>'"
            )
        principal = await services.keys.authenticate(key)
        if principal is None:
            raise NotAuthorizedException("invalid or revoked API key")
        scope["user"] = principal
        if principal.role is Role.MINER:
            bind_log_ids(miner_id=principal.subject)  # a miner key's subject is its miner id
        # Miner keys are not counted: an agent's calls follow the jobs it is given
        # (an input fetch and a result upload per attempt), and only for attempts it holds.
        if services.limiter is None or principal.role is Role.MINER:
            await next_app(scope, receive, send)
            return
        decision = await services.limiter.hit(principal.key_id)
        headers = _limit_headers(decision)
        if not decision.allowed:
            services.metrics.rate_limited.labels(principal.role.value).inc()
            raise TooManyRequests(
                f"rate limit exceeded; retry in {decision.retry_after} s", headers=headers
            )

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableScopeHeaders.from_message(message)
                for name, value in headers.items():
                    response_headers[name] = value
            await send(message)

        await next_app(scope, receive, send_with_limits)


def allow(*roles: Role) -> Any:
    """A guard admitting only callers whose key has one of `roles` (403 for the others).

    Async on purpose: Litestar runs a synchronous guard in a worker thread per request.
    """

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal: Principal = connection.user
        if principal.role not in roles:
            allowed = ", ".join(role.value for role in roles)
            raise PermissionDeniedException(
                f"{principal.role.value} keys cannot do this; allowed roles: {allowed}"
            )

    return guard


def owner_filter(principal: Principal) -> str | None:
    """Whose jobs the caller sees: a client only its own, auditors and admins everyone's."""
    return principal.subject if principal.role is Role.CLIENT else None
