"""``/playground``: a browser page for the public API, served as static files from the package.

The page is hand-written HTML, CSS and JavaScript (no build step, nothing from a CDN) and
calls only the public API (``/v1/jobs``, its events, ``/v1/models``, ``/readyz``,
``/v1/status``). Loading it needs no API key (it holds no data); the page asks for a key
when the API answers 401 and sends it as ``Authorization: Bearer`` on every call.
"""

from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

PLAYGROUND_PATH = "/playground"
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
"""The page's assets, by name (a fixed list: no path from the URL ever reaches the file system)."""
BASE_MARKER = "{{BASE}}"
"""Replaced in index.html by the route prefix the app is served under, so relative API paths resolve."""
HEADERS = {
    # Only our own scripts and styles; images from the API (blob:) and previews (data:).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> str:
    return resources.files("serve.http").joinpath("static", "playground", name).read_text(encoding="utf-8")


def add_playground_routes(app: FastAPI) -> None:
    """Add the page and its assets to ``app``, outside the API key (they are static)."""

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def playground(request: Request) -> Response:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        html = _read("index.html").replace(BASE_MARKER, base.replace('"', "%22"))
        return Response(html, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get(PLAYGROUND_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404)
        return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
