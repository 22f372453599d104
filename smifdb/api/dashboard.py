"""The browser pages: smifdb's dashboard, and smif's own app when the API serves a project.

The dashboard is one static page whose script polls the JSON API under /api/v1; the server
keeps no state for it (the page, its script and stylesheet ship in ``smifdb/api/static``).
It is at ``/dashboard/``, and at ``/`` too unless smif's app is there: with a project and
smif installed, the installed smif package's ``app/dist`` bundle is served unchanged at the
root its own absolute paths (``/main.js``) require, with ``index.html`` for the pages its
router draws (``/jobs/…``, ``/configure/…``), as ``smif app`` serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
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


# smif's bundle draws styles from its script (React components): inline styles, no more.
SMIF_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
}
# The paths smif's router draws (smif.http_api.register.register_routes).
SMIF_PAGES = ("/", "/jobs/", "/jobs/{path:path}", "/configure", "/configure/{path:path}")


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


async def favicon(request: Request) -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers=HEADERS)


async def to_dashboard(request: Request) -> Response:
    return RedirectResponse("/dashboard/", status_code=308)


def smif_bundle(project_dir: str | None) -> Path | None:
    """The installed smif package's app bundle, if the API serves a project and smif is here."""
    if project_dir is None:
        return None
    try:
        import smif
    except ImportError:
        return None
    dist = Path(smif.__file__).parent / "app" / "dist"
    return dist if (dist / "index.html").is_file() else None


def _smif_routes(dist: Path) -> list[BaseRoute]:
    def page(name: str, media_type: str | None = None) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            return FileResponse(dist / name, media_type=media_type, headers=SMIF_HEADERS)

        return serve

    routes: list[BaseRoute] = [Route(path, page("index.html", "text/html")) for path in SMIF_PAGES]
    files = sorted(p.name for p in dist.iterdir() if p.is_file() and p.name != "index.html")
    return routes + [Route(f"/{name}", page(name)) for name in files]


class _Static(StaticFiles):
    """Static files that browsers revalidate, so a new version is picked up at once."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def routes(smif_dist: Path | None) -> list[BaseRoute]:
    """The dashboard at /dashboard/, and smif's app at / if ``smif_dist`` (else the dashboard)."""
    pages = _smif_routes(smif_dist) if smif_dist is not None else [Route("/", index)]
    return [
        *pages,
        Route("/dashboard/", index),
        Route("/dashboard", to_dashboard),
        Route("/favicon.ico", favicon),
        Mount("/static", app=_Static(directory=STATIC), name="static"),
    ]
