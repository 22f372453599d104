"""API users, their roles and tokens, and sign-in throttling. Only hashes are stored: a database
dump leaks no credential.

Passwords use scrypt with a per-user salt (slow on purpose, so callers verify them off the event
loop and without holding a connection: ``credentials`` then ``password_matches``); tokens are
256 random bits, so a plain SHA-256 of them is enough to look one up without being reversible.

Token kinds: ``access``/``refresh`` (the DAFNI token endpoint's pair, one ``session_id`` a
login), ``session`` (a browser's cookie) and ``api`` (long-lived, for scripts and runners).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from smifdb import errors
from smifdb.limits import name_problem

ACCESS_SECONDS = 300  # DAFNI's Keycloak hands out 5-minute access tokens
REFRESH_SECONDS = 1800
SESSION_SECONDS = 12 * 3600  # a browser session lasts a working day
ROLES = ("viewer", "operator", "admin", "runner")
API_TOKEN_PREFIX = "smifdb_"  # recognisable by secret scanners
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_NO_PASSWORD = "!"  # matches no password: a user that signs in only with api tokens

# Throttling: a user name or client address may fail this often in WINDOW before each further
# failure blocks it for 2, 4, 8 … seconds, up to MAX_BLOCK.
FREE_FAILURES = {"user": 5, "address": 20}
WINDOW_SECONDS = 900
MAX_BLOCK_SECONDS = 900


class UserExists(errors.Conflict):
    """A user of that name already exists."""


class UnknownUser(errors.NotFound):
    """No user of that name."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


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


def password_matches(password: str, stored: str | None) -> bool:
    """Costs one scrypt whether or not the user exists: no timing oracle for names."""
    try:
        scheme, n, salt, digest = (stored or _dummy_hash()).split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=8, p=1, maxmem=2**26
        )
    except ValueError:
        return False
    return stored is not None and hmac.compare_digest(computed, base64.b64decode(digest))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@functools.cache
def _dummy_hash() -> str:
    """Computed on first use, not at import: every CLI command imports this module."""
    return hash_password("", salt=b"\0" * 16)


def require_owner(user: User | None, submitted_by: int | None, what: str) -> None:
    """An operator changes only what they submitted; an admin anything. ``user`` None: a
    command with database credentials, which the database's own roles govern."""
    if user is not None and not user.is_admin and submitted_by != user.id:
        raise errors.Forbidden(
            f"{what} was not submitted by {user.name}: only an admin may change it"
        )


def check_name(name: str) -> str:
    if problem := name_problem(name):  # length, NUL, lone surrogates: what text cannot store
        raise errors.BadInput(problem)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise errors.BadInput("a user name must not contain control characters (NUL, newline…)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise errors.BadInput(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


# -- users ----------------------------------------------------------------------------------

_ADD_USER = """
INSERT INTO api_users (name, password_hash, role) VALUES (%s, %s, %s)
ON CONFLICT (name) DO NOTHING RETURNING id
"""
_SET_PASSWORD = "UPDATE api_users SET password_hash = %s WHERE name = %s RETURNING id"
_SET_ROLE = "UPDATE api_users SET role = %s WHERE name = %s RETURNING id"
_REMOVE_USER = "DELETE FROM api_users WHERE name = %s RETURNING id"
_REVOKE_USER = "DELETE FROM api_tokens WHERE user_id = %s"
_USERS = """
SELECT u.name, u.role, u.created_at,
       (SELECT max(t.issued_at) FROM api_tokens t
        WHERE t.user_id = u.id AND t.kind IN ('access', 'session')) AS last_login_at,
       (SELECT count(*) FROM api_tokens t
        WHERE t.user_id = u.id AND t.kind = 'api'
          AND (t.expires_at IS NULL OR t.expires_at > now()))::int AS api_tokens
FROM api_users u ORDER BY u.name
"""
_CREDENTIALS = "SELECT id, name, role, password_hash FROM api_users WHERE name = %s"


def add_user(
    conn: psycopg.Connection, name: str, password: str | None, *, role: str = "operator"
) -> None:
    """``password`` None: the user signs in with api tokens only."""
    check_name(name)
    check_role(role)
    stored = hash_password(password) if password is not None else _NO_PASSWORD
    if conn.execute(_ADD_USER, (name, stored, role)).fetchone() is None:
        raise UserExists(f"user {name!r} already exists")


def _change(conn: psycopg.Connection, query: str, value: str, name: str) -> None:
    """Change a user and revoke every token they hold, in one transaction."""
    with conn.transaction():
        row = conn.execute(query, (value, name)).fetchone()
        if row is None:
            raise UnknownUser(f"no user {name!r}")
        conn.execute(_REVOKE_USER, [row[0]])


def set_password(conn: psycopg.Connection, name: str, password: str) -> None:
    _change(conn, _SET_PASSWORD, hash_password(password), name)


def set_role(conn: psycopg.Connection, name: str, role: str) -> None:
    _change(conn, _SET_ROLE, check_role(role), name)


def remove_user(conn: psycopg.Connection, name: str) -> None:
    """Tokens go with the user (cascade); records they submitted keep no link to the name."""
    if conn.execute(_REMOVE_USER, [name]).fetchone() is None:
        raise UnknownUser(f"no user {name!r}")


def users(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_USERS).fetchall()


def credentials(conn: psycopg.Connection, name: str) -> tuple[User | None, str | None]:
    """The user and stored hash for a sign-in, to verify after the connection is returned."""
    row = conn.execute(_CREDENTIALS, [name]).fetchone()
    return (User(row[0], row[1], row[2]), row[3]) if row else (None, None)


# -- throttling -----------------------------------------------------------------------------

_BLOCKED = """
SELECT extract(epoch FROM max(blocked_until) - now())::float FROM api_login_failures
WHERE ((scope = 'user' AND key = %(user)s) OR (scope = 'address' AND key = %(address)s))
  AND blocked_until > now()
"""
_FAILURES = f"""
CASE WHEN f.last_failure_at < now() - make_interval(secs => {WINDOW_SECONDS})
     THEN 1 ELSE f.failures + 1 END
"""
_FAIL = f"""
INSERT INTO api_login_failures AS f (scope, key, failures, last_failure_at)
VALUES (%(scope)s, %(key)s, 1, now())
ON CONFLICT (scope, key) DO UPDATE SET
    failures = {_FAILURES},
    last_failure_at = now(),
    blocked_until = CASE WHEN {_FAILURES} > %(free)s
        THEN now() + make_interval(secs => least({MAX_BLOCK_SECONDS},
                                                  2.0 ^ ({_FAILURES} - %(free)s)))
        END
"""
_FORGIVE = "DELETE FROM api_login_failures WHERE scope = 'user' AND key = %s"
_SWEEP_FAILURES = f"""
DELETE FROM api_login_failures
WHERE last_failure_at < now() - make_interval(secs => {WINDOW_SECONDS})
  AND (blocked_until IS NULL OR blocked_until < now())
"""


def blocked_for(conn: psycopg.Connection, name: str, address: str) -> float | None:
    """Seconds until this name and address may try again, or None if they may now."""
    return conn.execute(_BLOCKED, {"user": name, "address": address}).fetchone()[0]


def failed_login(conn: psycopg.Connection, name: str, address: str) -> None:
    with conn.transaction():
        for scope, key in (("user", name), ("address", address)):
            conn.execute(_FAIL, {"scope": scope, "key": key, "free": FREE_FAILURES[scope]})


# -- tokens ---------------------------------------------------------------------------------

_ISSUE = """
INSERT INTO api_tokens (token_hash, user_id, kind, expires_at, session_id, name)
VALUES (%(hash)s, %(user)s, %(kind)s,
        now() + make_interval(secs => %(seconds)s::float), %(session)s, %(name)s)
RETURNING id
"""
# Issuing is also when a user's expired tokens are swept: the table stays small without a job.
_SWEEP = "DELETE FROM api_tokens WHERE user_id = %s AND expires_at < now()"
_REFRESH_TOKEN = """
SELECT user_id, session_id, spent_at IS NOT NULL FROM api_tokens
WHERE token_hash = %s AND kind = 'refresh' AND expires_at > now()
FOR UPDATE
"""
_SPEND = "UPDATE api_tokens SET spent_at = now() WHERE token_hash = %s"
_REVOKE_SESSION = "DELETE FROM api_tokens WHERE session_id = %s"
_END = "DELETE FROM api_tokens WHERE token_hash = %s AND kind = %s RETURNING session_id"
_WHO = """
SELECT u.id, u.name, u.role FROM api_tokens t JOIN api_users u ON u.id = t.user_id
WHERE t.token_hash = %s AND t.kind = ANY(%s) AND t.spent_at IS NULL
  AND (t.expires_at IS NULL OR t.expires_at > now())
"""
_USER_ID = "SELECT id FROM api_users WHERE name = %s"
_API_TOKENS = """
SELECT t.id, u.name AS user, u.role, t.name, t.issued_at, t.expires_at
FROM api_tokens t JOIN api_users u ON u.id = t.user_id
WHERE t.kind = 'api' AND (%(user)s::text IS NULL OR u.name = %(user)s)
ORDER BY t.id
"""
_REVOKE_API_TOKEN = "DELETE FROM api_tokens WHERE id = %s AND kind = 'api' RETURNING id"


def _issue(
    conn: psycopg.Connection,
    user_id: int,
    kind: str,
    seconds: float | None,
    *,
    session: uuid.UUID | None = None,
    name: str | None = None,
    prefix: str = "",
) -> tuple[int, str]:
    token = prefix + secrets.token_urlsafe(32)
    args = {
        "hash": _token_hash(token),
        "user": user_id,
        "kind": kind,
        "seconds": seconds,
        "session": session,
        "name": name,
    }
    return conn.execute(_ISSUE, args).fetchone()[0], token


def _pair(conn: psycopg.Connection, user_id: int, session: uuid.UUID) -> Tokens:
    _, access = _issue(conn, user_id, "access", ACCESS_SECONDS, session=session)
    _, refresh_token = _issue(conn, user_id, "refresh", REFRESH_SECONDS, session=session)
    return Tokens(access, refresh_token, ACCESS_SECONDS, REFRESH_SECONDS)


def _signed_in(conn: psycopg.Connection, user: User) -> None:
    conn.execute(_SWEEP, [user.id])
    conn.execute(_FORGIVE, [user.name])
    conn.execute(_SWEEP_FAILURES)


def issue_pair(conn: psycopg.Connection, user: User) -> Tokens:
    """A verified sign-in at the DAFNI token endpoint: a new session's access/refresh pair."""
    with conn.transaction():
        _signed_in(conn, user)
        return _pair(conn, user.id, uuid.uuid4())


def start_session(conn: psycopg.Connection, user: User) -> str:
    """A verified sign-in at the login page: the browser's session cookie."""
    with conn.transaction():
        _signed_in(conn, user)
        return _issue(conn, user.id, "session", SESSION_SECONDS, session=uuid.uuid4())[1]


def refresh(conn: psycopg.Connection, refresh_token: str) -> Tokens | None:
    """Swap a live refresh token for a new pair of the same session. A refresh token works
    once: presenting a spent one again means it was copied, so the whole session ends."""
    with conn.transaction():
        row = conn.execute(_REFRESH_TOKEN, [_token_hash(refresh_token)]).fetchone()
        if row is None:
            return None
        user_id, session, spent = row
        if spent:
            conn.execute(_REVOKE_SESSION, [session])
            return None
        conn.execute(_SPEND, [_token_hash(refresh_token)])
        return _pair(conn, user_id, session)


def end_session(conn: psycopg.Connection, token: str, *, kind: str) -> bool:
    """Logout: the session of a refresh token (DAFNI) or a cookie (the login page) ends."""
    with conn.transaction():
        row = conn.execute(_END, (_token_hash(token), kind)).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            conn.execute(_REVOKE_SESSION, [row[0]])
        return True


def authenticate(conn: psycopg.Connection, token: str, kinds: tuple[str, ...]) -> User | None:
    row = conn.execute(_WHO, (_token_hash(token), list(kinds))).fetchone()
    return User(*row) if row else None


def create_api_token(
    conn: psycopg.Connection, user: str, *, name: str | None, seconds: float | None
) -> tuple[int, str]:
    """A long-lived bearer token (id, token); the token itself is shown once, never stored."""
    row = conn.execute(_USER_ID, [user]).fetchone()
    if row is None:
        raise UnknownUser(f"no user {user!r}")
    return _issue(conn, row[0], "api", seconds, name=name, prefix=API_TOKEN_PREFIX)


def api_tokens(conn: psycopg.Connection, user: str | None = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_API_TOKENS, {"user": user}).fetchall()


def revoke_api_token(conn: psycopg.Connection, token_id: int) -> None:
    if conn.execute(_REVOKE_API_TOKEN, [token_id]).fetchone() is None:
        raise errors.NotFound(f"no api token {token_id}")
