"""The runner: claim ready jobs, run them outside any transaction, record how they ended.

Three threads share nothing but in-memory job state; each has its own connection:

- the main loop claims up to the free slots in one short transaction, starts attempts in a
  thread pool, and records finished attempts in batches (one transaction per batch);
- the listener LISTENs for ready work and cancellations and wakes the other two;
- the heartbeat updates the runner's row, renews long leases, stops cancelled attempts and
  rescues jobs of dead runners.

Database outages are survived: attempts keep running, outcomes queue up in memory, and every
thread reconnects with backoff. Recording is fenced by lease owner and attempt, so whatever is
written late or twice changes nothing it should not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from smifdb import db
from smifdb.execute import Attempt, run_attempt
from smifdb.store import CANCEL_CHANNEL, FINISHED_CHANNEL, READY_CHANNEL, queue, read
from smifdb.store import runners as runner_rows
from smifdb.store.queue import Outcome

log = logging.getLogger("smifdb.runner")
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class RunnerConfig:
    slots: int
    name: str = field(default_factory=default_name)
    log_dir: Path = field(default_factory=lambda: Path.cwd() / "smifdb-logs")
    batch: int | None = None  # most jobs per claim; default: all free slots
    lease: float = 300.0  # seconds a claim holds a job before it must be renewed
    heartbeat: float = 2.0  # seconds between heartbeats (also cancellation checks)
    dead_after: float = 30.0  # a runner silent this long is dead; its jobs are rescued
    poll: float = 2.0  # seconds between polls when no notification arrives
    grace: float = 30.0  # on SIGTERM/SIGINT, how long running jobs may take to finish
    exit_when_idle: bool = False  # exit once nothing is waiting, ready or running anywhere
    workflow_id: int | None = None  # only this workflow's jobs; exit when it has finished


class Backoff:
    """Exponential backoff with jitter for reconnecting: 0.1 s doubling to 10 s."""

    def __init__(self, first: float = 0.1, cap: float = 10.0) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.5)
        self.current = min(self.current * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first


class Runner:
    def __init__(self, dsn: str, config: RunnerConfig) -> None:
        self.dsn = dsn
        self.config = config
        self.name = config.name
        self.lock = threading.Lock()
        self.active: dict[int, Attempt] = {}  # attempts whose outcome is not yet known
        self.pending: list[Outcome] = []  # outcomes not yet recorded
        self.busy = 0  # pool threads in use (a stopped Python attempt keeps its thread)
        self.counts = {"succeeded": 0, "failed": 0}  # since the last heartbeat
        self.total = {"succeeded": 0, "failed": 0, "claimed": 0}
        self.wake = threading.Event()  # main loop: work may be ready or an attempt ended
        self.check_now = threading.Event()  # heartbeat: a cancellation arrived
        self.stopping = threading.Event()
        self.closed = threading.Event()
        self.stop_deadline: float | None = None
        self.workflow_done: str | None = None
        self.pool = ThreadPoolExecutor(max_workers=config.slots, thread_name_prefix="job")
        self.conn: psycopg.Connection | None = None
        self.backoff = Backoff()
        self.retry_at = 0.0
        self.connected_since: float | None = None
        self.on_tick: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or idle/finished, as configured). Returns an exit status."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self._connect_main()
        assert self.conn is not None
        runner_rows.start(
            self.conn,
            self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.config.slots,
            dead_after=self.config.dead_after,
        )
        # Jobs still leased to this name belong to a dead earlier process of the same name.
        report = queue.rescue(
            self.conn, self.name, dead_after=self.config.dead_after, owner=self.name, force=True
        )
        if report.recorded:
            log.info(
                "took back %d job(s) from an earlier runner named %s",
                len(report.recorded),
                self.name,
            )
        log.info("runner %s started with %d slot(s)", self.name, self.config.slots)
        threads = [
            threading.Thread(target=self._listen, name="listener", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._main_loop()
        except BaseException:
            log.exception("runner %s failed; handing its jobs back", self.name)
            self._release_all()
            raise
        finally:
            self._shutdown(threads)
        return 0

    def request_stop(self, immediate: bool = False) -> None:
        """Stop claiming; running attempts get the grace period (none if ``immediate``)."""
        now = time.monotonic()
        if self.stopping.is_set() or immediate:
            self.stop_deadline = now
        else:
            self.stop_deadline = now + self.config.grace
        self.stopping.set()
        self.wake.set()
        self.check_now.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            log.info(
                "received %s: %s",
                signal.Signals(signum).name,
                "stopping now" if self.stopping.is_set() else "draining",
            )
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _release_all(self) -> None:
        """Stop every attempt and wait briefly for commands to end, so all can be recorded."""
        with self.lock:
            attempts = list(self.active.values())
        for attempt in attempts:
            self._stop_attempt(attempt, "released")
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        deadline = time.monotonic() + max(self.config.dead_after, 10)
        while self.pending and time.monotonic() < deadline:
            if not self._flush():
                time.sleep(self.backoff.next())
        with contextlib.suppress(*DB_ERRORS):
            if self.conn is not None:
                runner_rows.heartbeat(self.conn, self.name, **self._take_counts())
                runner_rows.set_state(self.conn, self.name, "stopped")
        self.closed.set()
        self.check_now.set()
        for t in threads:
            t.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.conn is not None:
            self.conn.close()
        log.info(
            "runner %s stopped: %d succeeded, %d failed",
            self.name,
            self.total["succeeded"],
            self.total["failed"],
        )

    # -- main loop ------------------------------------------------------------------------

    def _main_loop(self) -> None:
        while True:
            self.wake.clear()
            self._enforce_deadlines()
            if self.pending and not self._flush():
                self._sleep_for_reconnect()
                continue
            if self._finished():
                return
            claimed_all = False
            if not self.stopping.is_set() and self._db_ready():
                free = self.config.slots - self.busy
                if self.config.batch:
                    free = min(free, self.config.batch)
                if free > 0:
                    got = self._claim(free)
                    if got is None:
                        self._sleep_for_reconnect()
                        continue
                    claimed_all = got == free
            if self.on_tick is not None:
                self.on_tick()
            if claimed_all:
                continue  # more may be ready: claim again as soon as slots free up
            if self._idle_exit():
                return
            self.wake.wait(self._wait_time())

    def _finished(self) -> bool:
        with self.lock:
            idle = self.busy == 0 and not self.pending
        if self.stopping.is_set() and idle:
            return True
        return self.workflow_done is not None and idle

    def _idle_exit(self) -> bool:
        """Exit once idle if asked to, or once our workflow ended (even by a cancel elsewhere)."""
        wf = self.config.workflow_id
        wanted = self.config.exit_when_idle or wf is not None
        if not wanted or self.busy or self.pending or self.conn is None:
            return False
        try:
            if wf is not None:
                self.workflow_done = read.finished_status(self.conn, wf)
                return self.workflow_done is not None
            return not queue.anything_unfinished(self.conn)
        except DB_ERRORS:
            self._lost_connection()
            return False

    def _wait_time(self) -> float:
        wait = self.config.poll * random.uniform(0.8, 1.2)
        now = time.monotonic()
        with self.lock:
            for attempt in self.active.values():
                if attempt.deadline is not None:
                    wait = min(wait, max(attempt.deadline - now, 0) + 0.01)
        if self.stop_deadline is not None:
            wait = min(wait, max(self.stop_deadline - now, 0) + 0.01)
        if self.conn is not None and not self.stopping.is_set():
            try:
                due = queue.seconds_until_next_retry(self.conn)
            except DB_ERRORS:
                self._lost_connection()
                return min(wait, max(self.retry_at - now, 0.01))
            if due is not None:
                wait = min(wait, due + 0.01)
        return max(wait, 0.001)

    # -- claiming and running -------------------------------------------------------------

    def _claim(self, n: int) -> int | None:
        assert self.conn is not None
        try:
            jobs = queue.claim(
                self.conn,
                self.name,
                n,
                lease=self.config.lease,
                workflow_id=self.config.workflow_id,
            )
        except DB_ERRORS:
            self._lost_connection()
            return None
        for job in jobs:
            attempt = Attempt(job, self.name, self.config.log_dir)
            with self.lock:
                self.active[job.id] = attempt
                self.busy += 1
            log.info(
                "started %s/%s attempt %d",
                job.workflow_id,
                job.key,
                job.attempt,
                extra={"workflow_id": job.workflow_id, "job_key": job.key},
            )
            self.pool.submit(self._execute, attempt)
        self.total["claimed"] += len(jobs)
        return len(jobs)

    def _execute(self, attempt: Attempt) -> None:
        outcome = run_attempt(attempt)
        with self.lock:
            self.busy -= 1
            if self.active.get(attempt.job.id) is attempt:
                del self.active[attempt.job.id]
                self.pending.append(outcome)
        self.wake.set()

    def _report_now(self, attempt: Attempt) -> None:
        """Record a stopped Python attempt without waiting for its thread (it cannot be killed)."""
        with self.lock:
            if self.active.get(attempt.job.id) is attempt:
                del self.active[attempt.job.id]
                self.pending.append(attempt.stopped_outcome())
        self.wake.set()

    def _stop_attempt(self, attempt: Attempt, reason: str) -> None:
        attempt.stop(reason)
        if attempt.job.kind == "python":
            self._report_now(attempt)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self.lock:
            attempts = list(self.active.values())
        for attempt in attempts:
            if attempt.deadline is not None and now >= attempt.deadline and not attempt.stop_reason:
                self._stop_attempt(attempt, "timeout")
        if self.stop_deadline is not None and now >= self.stop_deadline:
            for attempt in attempts:
                if not attempt.stop_reason:
                    self._stop_attempt(attempt, "released")

    # -- recording ------------------------------------------------------------------------

    def _flush(self) -> bool:
        """Record pending outcomes in one transaction; False if the database is unreachable."""
        if not self._db_ready():
            return False
        with self.lock:
            batch, self.pending = self.pending, []
        try:
            report = queue.finish(self.conn, self.name, batch)
        except DB_ERRORS:
            with self.lock:
                self.pending = batch + self.pending
            self._lost_connection()
            return False
        recorded = set(report.recorded)
        for outcome in batch:
            if outcome.job_id not in recorded:
                log.warning(
                    "outcome of job %d attempt %d was not recorded: the lease had moved on",
                    outcome.job_id,
                    outcome.attempt,
                )
                continue
            if outcome.status in ("succeeded", "failed"):
                with self.lock:
                    self.counts[outcome.status] += 1
                    self.total[outcome.status] += 1
            log.info(
                "job %d %s (%s)",
                outcome.job_id,
                outcome.status,
                outcome.reason or "",
                extra={"workflow_id": outcome.workflow_id, "job_id": outcome.job_id},
            )
        wf = self.config.workflow_id
        if wf is not None and wf in report.finished_workflows:
            self.workflow_done = report.finished_workflows[wf]
        return True

    def _take_counts(self) -> dict[str, int]:
        counts = {"succeeded": self.counts["succeeded"], "failed": self.counts["failed"]}
        self.counts = {"succeeded": 0, "failed": 0}
        return counts

    # -- connection -----------------------------------------------------------------------

    def _connect_main(self) -> None:
        """First connection: errors here are the caller's (bad DSN, unmigrated schema...)."""
        self.conn = db.connect(self.dsn, connect_timeout=10)
        self.connected_since = time.monotonic()

    def _db_ready(self) -> bool:
        if self.conn is not None and not self.conn.closed:
            return True
        if time.monotonic() < self.retry_at:
            return False
        try:
            self.conn = db.connect(self.dsn, connect_timeout=5)
            known = self._known_job_ids()
            queue.release_unknown(self.conn, self.name, known)
        except DB_ERRORS as exc:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            self.retry_at = time.monotonic() + self.backoff.next()
            log.debug("database still unreachable: %s", exc)
            return False
        log.warning("reconnected to the database")
        self.backoff.reset()
        self.connected_since = time.monotonic()
        return True

    def _known_job_ids(self) -> list[int]:
        with self.lock:
            return list(self.active) + [o.job_id for o in self.pending]

    def _lost_connection(self) -> None:
        if self.conn is not None:
            log.warning("lost the database connection; running jobs continue, results are kept")
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None
        self.connected_since = None
        self.retry_at = time.monotonic() + self.backoff.next()

    def _sleep_for_reconnect(self) -> None:
        self._enforce_deadlines()
        self.wake.wait(max(self.retry_at - time.monotonic(), 0.05))

    # -- listener -------------------------------------------------------------------------

    def _listen(self) -> None:
        backoff = Backoff()
        while not self.closed.is_set():
            try:
                with db.connect(self.dsn, connect_timeout=5) as conn:
                    for channel in (READY_CHANNEL, CANCEL_CHANNEL, FINISHED_CHANNEL):
                        conn.execute(f"LISTEN {channel}")
                    backoff.reset()
                    self.wake.set()  # anything could have happened while we were not listening
                    while not self.closed.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.channel == CANCEL_CHANNEL:
                                self.check_now.set()
                            self.wake.set()
            except DB_ERRORS:
                self.closed.wait(backoff.next())

    # -- heartbeat ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        conn: psycopg.Connection | None = None
        backoff = Backoff()
        up_since = 0.0
        next_rescue = time.monotonic() + self.config.heartbeat * random.uniform(1, 3)
        while not self.closed.is_set():
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.dsn, connect_timeout=5)
                    up_since = time.monotonic()
                    backoff.reset()
                self._beat(conn)
                # Rescue only after being connected for dead_after: after an outage, peers
                # need that long to heartbeat again before they can be told apart from the dead.
                now = time.monotonic()
                if now >= next_rescue and now - up_since >= self.config.dead_after:
                    self._rescue(conn)
                    next_rescue = now + self.config.heartbeat * random.uniform(3, 6)
                wait = self.config.heartbeat
            except DB_ERRORS:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                wait = backoff.next()
            self.check_now.wait(wait)
            self.check_now.clear()
        if conn is not None:
            conn.close()

    def _beat(self, conn: psycopg.Connection) -> None:
        with self.lock:
            counts = self._take_counts()
            attempts = dict(self.active)
        try:
            runner_rows.heartbeat(conn, self.name, **counts)
        except DB_ERRORS:
            with self.lock:
                self.counts["succeeded"] += counts["succeeded"]
                self.counts["failed"] += counts["failed"]
            raise
        if self.stopping.is_set():
            runner_rows.set_state(conn, self.name, "draining")
        ids = sorted(attempts)
        queue.renew_leases(conn, self.name, ids, self.config.lease)
        for job_id in queue.cancel_requested(conn, self.name, ids):
            attempt = attempts[job_id]
            if not attempt.stop_reason:
                log.info("cancelling job %d on request", job_id)
                self._stop_attempt(attempt, "cancelled")

    def _rescue(self, conn: psycopg.Connection) -> None:
        lost = runner_rows.mark_lost(conn, self.config.dead_after)
        if lost:
            log.warning("runner(s) %s stopped heartbeating", ", ".join(lost))
        report = queue.rescue(conn, self.name, dead_after=self.config.dead_after)
        if report.recorded:
            log.warning("rescued %d job(s) from dead runners", len(report.recorded))
