"""The read-only dashboard at /ui: one HTML page, one stylesheet and one ES module.

The files are package data (app/api/ui/static), served as they are. The pages are
public; everything they show comes from the API with the key the user types, so the
browser, not this server, holds the key. A strict Content-Security-Policy allows
scripts, styles and requests from this origin only, and no inline script at all.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response
from litestar.datastructures import CacheControlHeader
from litestar.router import Router
from litestar.static_files import create_static_files_router

STATIC_DIRECTORY = Path(__file__).resolve().parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def add_security_headers(response: Response[object]) -> Response[object]:
    """Every dashboard answer carries the CSP and its companions (async: no worker thread)."""
    response.headers.update(SECURITY_HEADERS)
    return response


def ui_router() -> Router:
    """GET /ui (the page) and /ui/{file} (its assets, about 60 KB), asked for on every load."""
    return create_static_files_router(
        path="/ui",
        directories=[STATIC_DIRECTORY],
        html_mode=True,
        name="ui",
        after_request=add_security_headers,
        # No stale copies: after an upgrade the next load has the new files.
        cache_control=CacheControlHeader(no_cache=True),
        include_in_schema=False,
        tags=["dashboard"],
    )
