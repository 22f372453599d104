"""API users for tests: real users with real tokens in the test's database (never a bypass)."""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from smifdb import db
from smifdb.store import auth

PASSWORD = "correct horse battery"


def user_token(dsn: str, name: str = "admin", role: str = "admin") -> str:
    """A new user with a long-lived api token (and the password PASSWORD)."""
    with db.connect(dsn) as conn:
        auth.add_user(conn, name, PASSWORD, role=role)
        return auth.create_api_token(conn, name, name="tests", seconds=None)[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client(app: Any, token: str | None = None, **kwargs: Any) -> TestClient:
    """A test client on a loopback Host (the API's default allow-list), signed in by token."""
    c = TestClient(app, base_url="http://localhost", raise_server_exceptions=False, **kwargs)
    if token:
        c.headers.update(bearer(token))
    return c
