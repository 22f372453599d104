"""The live dashboard at ``/``: one static page whose script polls the JSON API under /api/v1.

The server keeps no state for it: the page, its script and its stylesheet are static files
shipped in the package (``smifdb/api/static``); everything live comes from the API.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# Only this origin's own script and stylesheet: no inline code, no outside resources.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: that makes a browser send "Origin: null" on this page's own POSTs.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


class _Static(StaticFiles):
    """Static files that browsers revalidate, so a new version is picked up at once."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


ROUTES = [
    Route("/", index),
    Mount("/static", app=_Static(directory=STATIC), name="static"),
]
