"""One guard in front of every route: Host allow-list, credentials, roles, and the cross-site
rules for browsers (docs/security.md).

It runs before routing, so a route added later is protected without doing anything, and a
refused request never reaches a handler or has its body read. What a handler still decides is
ownership (an operator cancels only what they submitted): that needs the record, so the store
checks it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from smifdb.api.errors import error_response
from smifdb.store import auth

SESSION_COOKIE = "smifdb_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CHALLENGE = 'Bearer realm="smifdb"'
RUNNER_TOKEN_TTL = 1.0  # seconds a runner token found valid is taken as valid (RunnerTokens)
BEARER_KINDS = ("access", "api")  # DAFNI's short-lived access tokens, and long-lived api tokens

# What answers without credentials: signing in, and what describes the API. Each is a
# (methods, full-match pattern) pair; /metrics is added unless a metrics token is set.
PUBLIC: tuple[tuple[frozenset[str], re.Pattern[str]], ...] = tuple(
    (frozenset(methods), re.compile(pattern))
    for methods, pattern in (
        (("GET", "HEAD", "POST"), r"/login"),
        (("GET", "HEAD"), r"/static/login\.css"),
        (("GET", "HEAD"), r"/openapi\.json"),
        (("POST",), r"/realms/[^/]+/protocol/openid-connect/(token/?|logout)"),
    )
)
METRICS = (frozenset({"GET", "HEAD"}), re.compile(r"/metrics"))
# Browser pages that send a signed-out user to the login page: the dashboard, smif's app.
PAGES = re.compile(r"/|/dashboard/?|/jobs(/.*)?|/configure(/.*)?")
# Any role with valid credentials may end its own session.
ANY_ROLE = re.compile(r"/logout|/api/auth/me")
RUNNER_PROTOCOL = re.compile(r"/api/runner/.*")
# POSTs that only read (DAFNI's catalogue search and metadata check): a viewer may send them.
READING_POSTS = re.compile(r"/catalogue/|/nid/validate/")
# Bodies here must be JSON (a cross-site form can send only form and text/plain bodies);
# DAFNI's routes keep the types dafni-cli sends.
JSON_BODIES = re.compile(r"/api/(?!runner/v1/blobs/).*")  # runners upload blobs as they are


@dataclass(frozen=True)
class Settings:
    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)
    public_url: str | None = None  # where clients reach this API, for URLs it hands out
    metrics_token: str | None = None
    extra_public: tuple = field(default=())

    @classmethod
    def make(
        cls,
        *,
        allowed_hosts: Iterable[str] = (),
        bind_host: str | None = None,
        public_url: str | None = None,
        metrics_token: str | None = None,
    ) -> Settings:
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        hosts.update(LOOPBACK_HOSTS)
        if bind_host and bind_host not in ("0.0.0.0", "::"):
            hosts.add(bind_host.lower().strip("[]"))
        return cls(
            allowed_hosts=frozenset(hosts),
            public_url=public_url.rstrip("/") if public_url else None,
            metrics_token=metrics_token or None,
            extra_public=() if metrics_token else (METRICS,),
        )

    def host_allowed(self, host: str) -> bool:
        return any(
            host == allowed or (allowed.startswith(".") and host.endswith(allowed))
            for allowed in self.allowed_hosts
        )

    def is_public(self, method: str, path: str) -> bool:
        return any(
            method in methods and pattern.fullmatch(path)
            for methods, pattern in (*PUBLIC, *self.extra_public)
        )


def hostname(host_header: str) -> str:
    """The name in a Host header, without the port ('[::1]:8000' -> '::1')."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def same_origin(conn: HTTPConnection) -> bool:
    """The request comes from a page of this server: its Origin names this scheme and host, or
    (no Origin) the browser says so itself."""
    origin = conn.headers.get("origin")
    if origin is not None and origin != "null":
        return origin.lower() == f"{conn.url.scheme}://{conn.headers.get('host', '')}".lower()
    # "null": a privacy-sensitive context (a no-referrer page's form, a sandboxed frame); the
    # browser's own Sec-Fetch-Site, which no page can set, says where it came from.
    return conn.headers.get("sec-fetch-site") == "same-origin"


def cross_site(conn: HTTPConnection) -> bool:
    """A browser says another site sent this (a request that carries no cookie may still be a
    forged sign-in); clients that are not browsers send neither header."""
    if conn.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = conn.headers.get("origin")
    return origin is not None and not same_origin(conn)


def _json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _has_body(conn: HTTPConnection) -> bool:
    length = conn.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in conn.headers


def bearer(conn: HTTPConnection) -> str | None:
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class RunnerTokens:
    """Runner tokens found valid in the last ``ttl`` seconds, by their hash. A runner's every
    request would otherwise cost a thread hop, a pooled connection and a query before its own
    (a tenth of a claim cycle's time); a revoked runner token, or one whose user changed role,
    is refused within ``ttl``. Only the runner protocol reads it."""

    def __init__(self, ttl: float = RUNNER_TOKEN_TTL, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._valid: dict[bytes, tuple[auth.User, float]] = {}

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode(errors="surrogatepass")).digest()

    def get(self, token: str) -> auth.User | None:
        found = self._valid.get(self._key(token))
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def put(self, token: str, user: auth.User) -> None:
        if len(self._valid) >= self.size:
            self._valid.clear()
        self._valid[self._key(token)] = (user, time.monotonic() + self.ttl)


class Guard:
    """The authentication middleware: every request passes here before any route."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.runner_tokens = RunnerTokens()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        response = await self._refusal(request)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refusal(self, request: Request) -> Response | None:
        """None to let the request through (with ``scope['user']`` set), else the answer."""
        settings, method, path = self.settings, request.method, request.url.path
        host = hostname(request.headers.get("host", ""))
        if not settings.host_allowed(host):
            return error_response(
                request,
                400,
                f"Host {host!r} is not allowed: start the API with --allowed-host {host or 'NAME'}",
            )
        request.scope["user"], request.scope["auth"] = None, None
        if path == "/metrics" and settings.metrics_token:
            given = bearer(request) or ""
            if hmac.compare_digest(given.encode(), settings.metrics_token.encode()):
                return None
            return _unauthorized(request, "/metrics needs 'Authorization: Bearer <metrics token>'")
        if settings.is_public(method, path):
            return None

        token, via = bearer(request), "bearer"
        if token is None and request.headers.get("authorization"):
            return _unauthorized(request, "only 'Authorization: Bearer <token>' is accepted")
        if token is None:
            token, via = request.cookies.get(SESSION_COOKIE), "cookie"
        user = None
        runner_call = via == "bearer" and RUNNER_PROTOCOL.fullmatch(path) is not None
        if token and runner_call:
            user = self.runner_tokens.get(token)
        if token and user is None:
            kinds = BEARER_KINDS if via == "bearer" else ("session",)
            user = await run_in_threadpool(_authenticate, request, token, kinds)
            if runner_call and user is not None and user.role == "runner":
                self.runner_tokens.put(token, user)
        if user is None:
            if (
                via == "cookie"
                and method == "GET"
                and PAGES.fullmatch(path)
                and _wants_html(request)
            ):
                # Signed out, or the session ended: sign in, then back to this page.
                here = f"{path}?{request.url.query}" if request.url.query else path
                return RedirectResponse(f"/login?next={quote(here, safe='/')}", status_code=303)
            message = (
                "the token is invalid or has expired"
                if token
                else "sign in: send 'Authorization: Bearer <token>' or use the login page"
            )
            return _unauthorized(request, message, invalid=bool(token and via == "bearer"))
        request.scope["user"], request.scope["auth"] = user, via

        if via == "cookie" and method not in SAFE_METHODS and not same_origin(request):
            return error_response(
                request, 403, "a cross-origin request may not use this session's cookie"
            )
        if refused := _role_refusal(user, method, path):
            return error_response(request, 403, refused)
        if (
            method not in SAFE_METHODS
            and JSON_BODIES.fullmatch(path)
            and _has_body(request)
            and not _json_media(request.headers.get("content-type", ""))
        ):
            return error_response(request, 415, "the body must be sent as 'application/json'")
        return None


def _authenticate(request: Request, token: str, kinds: tuple[str, ...]) -> auth.User | None:
    with request.app.state.pool.connection() as conn:
        return auth.authenticate(conn, token, kinds)


def _role_refusal(user: auth.User, method: str, path: str) -> str | None:
    if ANY_ROLE.fullmatch(path):
        return None
    if user.role == "runner":
        return None if RUNNER_PROTOCOL.fullmatch(path) else "a runner token may only run jobs"
    if RUNNER_PROTOCOL.fullmatch(path):
        return f"user {user.name!r} is a {user.role}: only a runner token may run jobs"
    if method not in SAFE_METHODS and user.role == "viewer" and not READING_POSTS.fullmatch(path):
        return f"user {user.name!r} is a viewer: it may only read"
    return None


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _unauthorized(request: Request, message: str, *, invalid: bool = False) -> Response:
    challenge = f'{CHALLENGE}, error="invalid_token"' if invalid else CHALLENGE
    return error_response(request, 401, message, headers={"WWW-Authenticate": challenge})
