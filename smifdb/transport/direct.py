"""The runner's operations on a PostgreSQL connection: the store's functions, one per call.

Runners on the database's own site use this; so does the API (smifdb.api.runners) on behalf
of runners that speak HTTP, each request on a pooled connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import psycopg

from smifdb import db, store
from smifdb.store import CANCEL_CHANNEL, FINISHED_CHANNEL, READY_CHANNEL, queue, read
from smifdb.store import runners as runner_rows
from smifdb.store.queue import FinishReport, Outcome, Scope
from smifdb.transport import Beat


class DirectChannel:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()

    def register(
        self, name: str, *, host: str, pid: int, slots: int, dead_after: float, max_losses: int
    ) -> tuple[str, FinishReport]:
        runner_rows.start(self.conn, name, host=host, pid=pid, slots=slots, dead_after=dead_after)
        # Jobs still leased to this name belong to a dead earlier process of the same name.
        report = queue.rescue(
            self.conn, name, dead_after=dead_after, owner=name, force=True, max_losses=max_losses
        )
        return name, report

    def beat(
        self,
        name: str,
        host: str,
        pid: int,
        counts: dict[str, int],
        *,
        draining: bool = False,
        job_ids: Sequence[int] = (),
        lease: float = 300.0,
    ) -> Beat:
        if not runner_rows.heartbeat(self.conn, name, host, pid, **counts):
            return Beat(ours=False, cancel=[])
        if draining:
            runner_rows.set_state(self.conn, name, host, pid, "draining")
        ids = sorted(job_ids)
        queue.renew_leases(self.conn, name, ids, lease)
        return Beat(ours=True, cancel=queue.cancel_requested(self.conn, name, ids))

    def cycle(
        self,
        name: str,
        outcomes: list[Outcome],
        *,
        claim_n: int = 0,
        lease: float = 300.0,
        scope: Scope = queue.ANYWHERE,
        close: Iterable[int] = (),
        recheck: Iterable[int] = (),
        defer_settle: bool = True,
    ) -> FinishReport:
        return queue.finish(
            self.conn,
            name,
            outcomes,
            claim_n=claim_n,
            lease=lease,
            scope=scope,
            close=close,
            recheck=recheck,
            defer_settle=defer_settle,
        )

    def reconnect(self, name: str, host: str, pid: int, known: list[int]) -> FinishReport | None:
        if not runner_rows.heartbeat(self.conn, name, host, pid):
            return None
        return queue.release_unknown(self.conn, name, known)

    def rescue(
        self, name: str, *, dead_after: float, max_losses: int
    ) -> tuple[list[str], FinishReport]:
        lost = runner_rows.mark_lost(self.conn, dead_after)
        report = queue.rescue(self.conn, name, dead_after=dead_after, max_losses=max_losses)
        return lost, report

    def set_state(self, name: str, host: str, pid: int, state: str) -> None:
        runner_rows.set_state(self.conn, name, host, pid, state)

    def finished(self, scope: Scope) -> str | None:
        if scope.workflow_id is not None:
            return read.finished_status(self.conn, scope.workflow_id)
        if scope.model_run_id is not None:
            return read.model_run_finished_status(self.conn, scope.model_run_id)
        return None

    def anything_unfinished(self) -> bool:
        return queue.anything_unfinished(self.conn)

    def next_retry(self) -> float | None:
        return queue.seconds_until_next_retry(self.conn)

    # -- direct only ------------------------------------------------------------------------

    def listen(self) -> None:
        store.listen(self.conn, READY_CHANNEL, CANCEL_CHANNEL, FINISHED_CHANNEL)

    def hear(self, timeout: float) -> Iterator[str]:
        """The channels notified, as they come, for up to ``timeout`` seconds."""
        for note in self.conn.notifies(timeout=timeout):
            yield note.channel


class DirectTransport:
    """Runners on the database's site: two connections (main loop, heartbeat)."""

    listens = True  # the heartbeat channel can LISTEN between beats

    def __init__(self, dsn: str, *, listen: bool = True) -> None:
        self.dsn, self.listens = dsn, listen

    def connect(self) -> DirectChannel:
        """Without LISTEN the runner keeps no session state, and no prepared statements
        (which a transaction-pooling PgBouncer before 1.21 cannot carry between clients)."""
        if self.listens:
            return DirectChannel(db.connect(self.dsn, connect_timeout=5))
        return DirectChannel(db.connect(self.dsn, connect_timeout=5, prepare_threshold=None))
