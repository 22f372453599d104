"""Runners: registration, one heartbeat row update per runner, and status."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from smifdb import errors
from smifdb.store import UNDER_OPEN_CLAIMS


class RunnerNameInUse(errors.Conflict):
    """Another live runner already has this name."""


# A registration may be renewed, but never under a runner that is running (or thought to be).
_REGISTER = """
INSERT INTO runners (name, host, slots, state)
VALUES (%(name)s, %(host)s, %(slots)s, 'registered')
ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, slots = EXCLUDED.slots
WHERE runners.state NOT IN ('active', 'draining')
RETURNING id
"""

# Take over the name unless a live process (fresh heartbeat, other pid or host) holds it.
_START = """
INSERT INTO runners (name, host, pid, slots, state, last_heartbeat_at)
VALUES (%(name)s, %(host)s, %(pid)s, %(slots)s, 'active', now())
ON CONFLICT (name) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, slots = EXCLUDED.slots, state = 'active',
    last_heartbeat_at = now()
WHERE runners.state NOT IN ('active', 'draining')
   OR runners.last_heartbeat_at IS NULL
   OR runners.last_heartbeat_at < now() - make_interval(secs => %(dead_after)s)
   OR (runners.host = EXCLUDED.host AND runners.pid = EXCLUDED.pid)
RETURNING id
"""

_HOLDER = "SELECT host, pid, last_heartbeat_at FROM runners WHERE name = %s"

_HEARTBEAT = """
UPDATE runners SET
    last_heartbeat_at = now(),
    state = CASE WHEN state = 'lost' THEN 'active' ELSE state END,
    jobs_succeeded = jobs_succeeded + %(succeeded)s,
    jobs_failed = jobs_failed + %(failed)s,
    jobs_claimed = jobs_claimed + %(claimed)s
WHERE name = %(name)s AND host IS NOT DISTINCT FROM %(host)s AND pid IS NOT DISTINCT FROM %(pid)s
"""

_SET_STATE = """
UPDATE runners SET state = %(state)s
WHERE name = %(name)s AND host IS NOT DISTINCT FROM %(host)s AND pid IS NOT DISTINCT FROM %(pid)s
"""

_MARK_LOST = """
UPDATE runners SET state = 'lost'
WHERE state IN ('active', 'draining')
  AND last_heartbeat_at < now() - make_interval(secs => %(dead_after)s)
RETURNING name
"""

_STATUS = f"""
SELECT r.name, r.host, r.pid, r.slots,
       CASE WHEN r.state IN ('active', 'draining')
                 AND r.last_heartbeat_at < now() - make_interval(secs => %(dead_after)s)
            THEN 'lost' ELSE r.state::text END AS state,
       (SELECT count(*) {UNDER_OPEN_CLAIMS}
        WHERE c.closed_at IS NULL AND c.owner = r.name)::int AS busy,
       r.last_heartbeat_at,
       extract(epoch FROM now() - r.last_heartbeat_at)::float AS heartbeat_age,
       r.jobs_succeeded, r.jobs_failed, r.jobs_claimed, r.registered_at
FROM runners r
WHERE r.name > coalesce(%(after)s::text, '')  -- names are never empty (check_name)
ORDER BY r.name
LIMIT %(limit)s
"""


def check_name(name: str) -> None:
    """A runner name is a lease owner and a line of `runner status`: printable, one line."""
    if not name.strip() or len(name) > 200 or not name.isprintable():
        raise errors.BadInput(f"runner name {name!r} must be 1 to 200 printable characters")


def register(conn: psycopg.Connection, name: str, slots: int, host: str | None) -> int:
    check_name(name)
    row = conn.execute(_REGISTER, {"name": name, "slots": slots, "host": host}).fetchone()
    if row is None:
        holder = conn.execute(_HOLDER, [name]).fetchone()
        raise RunnerNameInUse(
            f"runner {name!r} is running (host {holder[0]}, pid {holder[1]}); "
            "register it again once it has stopped"
        )
    return row[0]


def start(
    conn: psycopg.Connection, name: str, *, host: str, pid: int, slots: int, dead_after: float
) -> int:
    check_name(name)
    row = conn.execute(
        _START,
        {"name": name, "host": host, "pid": pid, "slots": slots, "dead_after": dead_after},
    ).fetchone()
    if row is None:
        holder = conn.execute(_HOLDER, [name]).fetchone()
        raise RunnerNameInUse(
            f"runner name {name!r} is in use by a live runner (host {holder[0]}, pid {holder[1]},"
            f" last heartbeat {holder[2]:%H:%M:%S}); choose another --name"
        )
    return row[0]


def heartbeat(
    conn: psycopg.Connection,
    name: str,
    host: str,
    pid: int,
    succeeded: int = 0,
    failed: int = 0,
    claimed: int = 0,
) -> bool:
    """One row update per runner: liveness, and the counters' growth since the last beat.

    False if the name is no longer this process's: a runner silent past dead_after (paused,
    cut off) may find another process started under its name meanwhile.
    """
    params = {"name": name, "host": host, "pid": pid}
    params |= {"succeeded": succeeded, "failed": failed, "claimed": claimed}
    return conn.execute(_HEARTBEAT, params).rowcount == 1


def set_state(conn: psycopg.Connection, name: str, host: str, pid: int, state: str) -> None:
    """Only while the name is this process's (see heartbeat)."""
    conn.execute(_SET_STATE, {"name": name, "host": host, "pid": pid, "state": state})


def mark_lost(conn: psycopg.Connection, dead_after: float) -> list[str]:
    return [r[0] for r in conn.execute(_MARK_LOST, {"dead_after": dead_after})]


def status(
    conn: psycopg.Connection,
    dead_after: float,
    *,
    limit: int | None = None,
    after: str | None = None,
) -> list[dict]:
    """By name, from after the runner ``after`` (runners_name_key); every runner by default."""
    params = {"dead_after": dead_after, "limit": limit, "after": after}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_STATUS, params).fetchall()
