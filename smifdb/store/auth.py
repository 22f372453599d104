"""API users and bearer tokens. Only hashes are stored: a database dump leaks no credential.

Passwords use scrypt with a per-user salt (slow on purpose); tokens are 256 random bits, so a
plain SHA-256 of them is enough to look one up without being reversible.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import psycopg

ACCESS_SECONDS = 300  # DAFNI's Keycloak hands out 5-minute access tokens
REFRESH_SECONDS = 1800
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UserExists(RuntimeError):
    """A user of that name already exists."""


class UnknownUser(LookupError):
    """No user of that name."""


@dataclass(frozen=True)
class Tokens:
    access: str
    refresh: str
    access_seconds: int
    refresh_seconds: int


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${b64(salt).decode()}${b64(digest).decode()}"


def _password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=8, p=1
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@functools.cache
def _dummy_hash() -> str:
    """A password check against a missing user still costs one scrypt: no timing oracle for
    names. Computed on first use, not at import: every CLI command imports this module."""
    return hash_password("", salt=b"\0" * 16)


_ADD_USER = """
INSERT INTO api_users (name, password_hash) VALUES (%s, %s)
ON CONFLICT (name) DO NOTHING RETURNING id
"""
_SET_PASSWORD = "UPDATE api_users SET password_hash = %s WHERE name = %s RETURNING id"
_REMOVE_USER = "DELETE FROM api_users WHERE name = %s RETURNING id"
_REVOKE_USER = "DELETE FROM api_tokens WHERE user_id = (SELECT id FROM api_users WHERE name = %s)"
_REVOKE_SESSION = """
DELETE FROM api_tokens WHERE user_id IN (SELECT user_id FROM api_tokens WHERE token_hash = %s)
"""
_USERS = """
SELECT u.name, u.created_at,
       (SELECT max(t.issued_at) FROM api_tokens t WHERE t.user_id = u.id) AS last_login_at
FROM api_users u ORDER BY u.name
"""
_USER_BY_NAME = "SELECT id, password_hash FROM api_users WHERE name = %s"
_ISSUE = """
INSERT INTO api_tokens (token_hash, user_id, kind, expires_at)
VALUES (%(hash)s, %(user)s, %(kind)s, now() + make_interval(secs => %(seconds)s))
"""
# Issuing is also when a user's expired tokens are swept: the table stays small without a job.
_SWEEP = "DELETE FROM api_tokens WHERE user_id = %s AND expires_at < now()"
_SPEND_REFRESH = """
DELETE FROM api_tokens
WHERE token_hash = %s AND kind = 'refresh' AND expires_at > now()
RETURNING user_id
"""
_WHO = """
SELECT u.name FROM api_tokens t JOIN api_users u ON u.id = t.user_id
WHERE t.token_hash = %s AND t.kind = 'access' AND t.expires_at > now()
"""


def add_user(conn: psycopg.Connection, name: str, password: str) -> None:
    if conn.execute(_ADD_USER, (name, hash_password(password))).fetchone() is None:
        raise UserExists(f"user {name!r} already exists")


def set_password(conn: psycopg.Connection, name: str, password: str) -> None:
    with conn.transaction():
        if conn.execute(_SET_PASSWORD, (hash_password(password), name)).fetchone() is None:
            raise UnknownUser(f"no user {name!r}")
        conn.execute(_REVOKE_USER, [name])


def remove_user(conn: psycopg.Connection, name: str) -> None:
    if conn.execute(_REMOVE_USER, [name]).fetchone() is None:
        raise UnknownUser(f"no user {name!r}")


def users(conn: psycopg.Connection) -> list[dict]:
    cur = conn.execute(_USERS)
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur]


def _issue(conn: psycopg.Connection, user_id: int) -> Tokens:
    access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    conn.execute(_SWEEP, [user_id])
    for token, kind, seconds in (
        (access, "access", ACCESS_SECONDS),
        (refresh, "refresh", REFRESH_SECONDS),
    ):
        conn.execute(
            _ISSUE, {"hash": _token_hash(token), "user": user_id, "kind": kind, "seconds": seconds}
        )
    return Tokens(access, refresh, ACCESS_SECONDS, REFRESH_SECONDS)


def login(conn: psycopg.Connection, name: str, password: str) -> Tokens | None:
    """New tokens for a right name and password, else None."""
    row = conn.execute(_USER_BY_NAME, [name]).fetchone()
    if not _password_matches(password, row[1] if row else _dummy_hash()) or row is None:
        return None
    with conn.transaction():
        return _issue(conn, row[0])


def refresh(conn: psycopg.Connection, refresh_token: str) -> Tokens | None:
    """Swap a live refresh token for new tokens; each refresh token works once."""
    with conn.transaction():
        row = conn.execute(_SPEND_REFRESH, [_token_hash(refresh_token)]).fetchone()
        return _issue(conn, row[0]) if row else None


def user_for(conn: psycopg.Connection, access_token: str) -> str | None:
    row = conn.execute(_WHO, [_token_hash(access_token)]).fetchone()
    return row[0] if row else None


def logout(conn: psycopg.Connection, refresh_token: str) -> None:
    """Revoke every token of the refresh token's user (Keycloak's logout ends the session)."""
    conn.execute(_REVOKE_SESSION, [_token_hash(refresh_token)])
