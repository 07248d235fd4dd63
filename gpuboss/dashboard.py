"""The dashboard: ``GET /`` and its two static assets under ``/static/``.

The page is plain HTML, CSS and JavaScript shipped inside the package (``gpuboss/static``, no
build step, nothing from a CDN). Its script polls ``v1/status``, ``v1/events`` and ``v1/consumers``
every second with the token from ``#token=...`` in the address, if any, kept in the browser's
local storage. The page itself needs no token: it holds no data until the script fetches it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse

from gpuboss_client import NotFound

__all__ = ["ASSETS", "router"]

#: the files served under ``/static/``, with their media types; nothing else is
ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}

# The page runs only its own script and talks only to this origin; the token it keeps in local
# storage is then out of reach of anything injected, and the page cannot be framed.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("gpuboss").joinpath("static", name).read_bytes()


router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> Response:
    """The dashboard page."""
    return HTMLResponse(_read("index.html"), headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """One of the dashboard's :data:`ASSETS`; any other name is 404 ``not_found``."""
    media_type = ASSETS.get(name)
    if media_type is None:
        err = NotFound(f"no static file {name!r}")
        return JSONResponse(err.to_dict(), status_code=err.http_status)
    return Response(_read(name), media_type=media_type, headers=_HEADERS)
