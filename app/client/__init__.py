"""The jobledger Python SDK: `Client` (blocking) and `AsyncClient` (asyncio), see docs/clients.md.

Both return the API's own wire Structs (app.api.schemas) and raise `ApiError`
subclasses, `ConnectionFailed` or `IntegrityError`. Importing this package pulls
in httpx and msgspec, never the server.
"""

from app.api.schemas import (
    FileInput,
    HistoryResponse,
    JobEvent,
    JobEventsResponse,
    JobListResponse,
    JobStatusResponse,
    SubmitJobResponse,
)
from app.client.async_client import AsyncClient
from app.client.config import ClientConfig, InsecureConfigWarning, resolve_config
from app.client.core import TERMINAL_STATUSES, DownloadResult, RetryPolicy, WatchUpdate
from app.client.errors import (
    ApiError,
    BadRequest,
    ConfigError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    Gone,
    IntegrityError,
    InvalidResponse,
    JobledgerError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationError,
    WaitTimeout,
)
from app.client.sync_client import Client

__all__ = [
    "TERMINAL_STATUSES",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientConfig",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "DownloadResult",
    "FileInput",
    "Forbidden",
    "Gone",
    "HistoryResponse",
    "InsecureConfigWarning",
    "IntegrityError",
    "InvalidResponse",
    "JobEvent",
    "JobEventsResponse",
    "JobListResponse",
    "JobStatusResponse",
    "JobledgerError",
    "NotFound",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "SubmitJobResponse",
    "Unauthorized",
    "ValidationError",
    "WaitTimeout",
    "WatchUpdate",
    "resolve_config",
]
