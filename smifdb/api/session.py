"""Signing in: the login page and its session cookie, and the one sign-in path that the DAFNI
token endpoint shares with it (throttled, hashed off the event loop, holding no connection).
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs, quote

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from smifdb import errors
from smifdb.api.errors import read_body
from smifdb.api.pool import in_db
from smifdb.api.security import SESSION_COOKIE, cross_site
from smifdb.store import auth

MAX_FORM = 16 * 1024
# Sign-ins waiting for a hashing thread beyond this are turned away at once: a flood queues
# no further than this, and other routes never wait for it (they use other threads).
MAX_WAITING_SIGN_INS = 64
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: that makes a browser send "Origin: null" on this page's own POSTs.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def client_address(request: Request) -> str:
    """The client's address (the proxy's X-Forwarded-For only with --behind-proxy)."""
    return request.client.host if request.client else "unknown"


async def sign_in(request: Request, name: str, password: str) -> auth.User:
    """The user for a right name and password; Unauthorized, TooManyRequests otherwise."""
    auth.check_name(name)
    address = client_address(request)

    def blocked(conn) -> None:
        wait = auth.blocked_for(conn, name, address)
        if wait is not None:
            raise errors.TooManyRequests(
                f"too many failed sign-ins: try again in {int(wait) + 1} s", retry_after=wait
            )

    def lookup(conn) -> tuple[auth.User | None, str | None]:
        blocked(conn)
        return auth.credentials(conn, name)

    def settle(conn, matches: bool) -> None:
        if not matches:
            auth.failed_login(conn, name, address)
        # Guesses hashed side by side all passed the first check: once one of them has set off
        # the block, none is answered right or wrong, so a burst learns only the guesses that
        # came before it.
        blocked(conn)
        if not matches:
            raise errors.Unauthorized("wrong user name or password")

    user, stored = await in_db(request, lookup)
    limiter: anyio.CapacityLimiter = request.app.state.hash_limiter
    if limiter.statistics().tasks_waiting >= MAX_WAITING_SIGN_INS:
        raise errors.TooManyRequests("too many sign-ins at once: try again", retry_after=1)
    matches = await anyio.to_thread.run_sync(
        auth.password_matches, password, stored, limiter=limiter
    )
    await in_db(request, settle, matches and user is not None)
    assert user is not None
    return user


async def form(request: Request) -> dict[str, str]:
    body = await read_body(request, max_bytes=MAX_FORM)
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        return {}
    return {k: v[0] for k, v in fields.items()}


def _next(value: str | None) -> str:
    """Only a path on this server: never an open redirect."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/"


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · smifdb</title>
<link rel="stylesheet" href="/static/login.css">
</head>
<body>
<main>
<h1>smifdb</h1>
<form method="post" action="/login?next={next_q}">
{message}
<label>User name <input name="name" autocomplete="username" required autofocus value="{name}"></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button>
</form>
</main>
</body>
</html>
"""


def _page(next_path: str, *, message: str = "", name: str = "", status: int = 200, headers=None):
    body = _PAGE.format(
        next_q=html.escape(quote(next_path, safe="/")),
        name=html.escape(name),
        message=f'<p class="error" role="alert">{html.escape(message)}</p>' if message else "",
    )
    return HTMLResponse(body, status, headers={**PAGE_HEADERS, **(headers or {})})


async def login_page(request: Request) -> Response:
    return _page(_next(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """The login form's POST: a session cookie and back to the page the user came from."""
    next_path = _next(request.query_params.get("next"))
    if cross_site(request):
        return _page(next_path, message="a sign-in from another site is refused", status=403)
    fields = await form(request)
    name, password = fields.get("name", ""), fields.get("password", "")
    try:
        user = await sign_in(request, name, password)
    except errors.Error as exc:
        return _page(
            next_path, message=exc.message, name=name, status=exc.status, headers=exc.headers
        )
    token = await in_db(request, auth.start_session, user)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=auth.SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    """Ends the session server-side (the guard has checked the cookie and its origin)."""
    token = request.cookies.get(SESSION_COOKIE)
    if token and request.scope.get("auth") == "cookie":
        await in_db(request, lambda conn: auth.end_session(conn, token, kind="session"))
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def me(request: Request) -> JSONResponse:
    user: auth.User = request.user
    return JSONResponse({"data": {"name": user.name, "role": user.role}, "error": {}})


ROUTES = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/api/auth/me", me, methods=["GET"]),
]
