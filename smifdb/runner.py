"""The runner: claim ready jobs, run them outside any transaction, record how they ended.

Two threads share nothing but in-memory job state; each has its own channel to the queue
(smifdb.transport: a PostgreSQL connection, or requests to the API for a runner that reaches
only the API; the runner is the same either way):

- the main loop claims up to the free slots in one short transaction, starts attempts in a
  thread pool, and records finished attempts in batches (one transaction per batch);
- the heartbeat updates the runner's row, renews long leases, stops cancelled attempts and
  rescues jobs of dead runners; between beats a direct runner's heartbeat connection LISTENs
  for ready work and cancellations and wakes the main loop (unless ``listen`` is off: then the
  main loop polls, and no session state is kept, as PgBouncer's transaction pooling needs).
  An HTTP runner has a third thread instead, long-polling the API's ``wait``.

Jobs with files move them through smifdb.files (data connections of their own, opened only
while they move files, or the API's blob routes).

Outages are survived: attempts keep running, outcomes queue up in memory, and every thread
reconnects with backoff. Recording is fenced by lease owner and attempt, so whatever is
written late or twice changes nothing it should not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_mod
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from smifdb import kinds, logs, workers
from smifdb.cache import DEFAULT_MAX_BYTES as DEFAULT_CACHE_BYTES
from smifdb.cache import Cache
from smifdb.db import Backoff
from smifdb.execute import (
    DEFAULT_PYTHON_ALLOW,
    MAX_LOG_BYTES,
    MAX_RESULT_BYTES,
    Attempt,
    JobPolicy,
)
from smifdb.files import JobFiles, Source
from smifdb.pgserver import default_home
from smifdb.store import CANCEL_CHANNEL, queue
from smifdb.store.blobs import DEFAULT_MAX_FILE_BYTES
from smifdb.store.queue import Outcome
from smifdb.transport import ERRORS, Channel, Refused, Unstorable
from smifdb.transport.direct import DirectChannel, DirectTransport
from smifdb.watchdog import Watchdog

log = logging.getLogger("smifdb.runner")
UNSTORABLE = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded, Unstorable)
WAIT = 25.0  # seconds an HTTP runner's wait for work lasts (the API answers sooner if it can)
LINGER = 0.002  # seconds an outcome may wait for others to share its transaction
SETTLE_AFTER = 1.0  # most seconds a recheck or a claim to close waits for the next cycle


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
    model_run_id: int | None = None  # only this model run's jobs; exit when it has finished
    python_allow: tuple[str, ...] = DEFAULT_PYTHON_ALLOW  # module prefixes python jobs may call
    max_runner_losses: int = queue.MAX_RUNNER_LOSSES  # a job losing this many runners fails
    max_result_bytes: int = MAX_RESULT_BYTES  # a bigger result file fails its attempt
    max_log_bytes: int = MAX_LOG_BYTES  # a job's log keeps its head and tail within this
    cache_dir: Path = field(default_factory=lambda: default_home() / "cache")  # files, folders
    cache_max_bytes: int = DEFAULT_CACHE_BYTES  # the cache evicts least recently used past this
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a bigger output file fails its attempt
    listen: bool = True  # LISTEN between heartbeats; off: poll only (transaction pooling)
    python_in_thread: bool = False  # python jobs in slot threads, not worker processes
    preload: tuple[str, ...] = ()  # modules the python workers' zygote imports once
    worker_max_jobs: int = workers.DEFAULT_MAX_JOBS  # a python worker is replaced after these
    worker_max_memory: int = workers.DEFAULT_MAX_MEMORY  # ...or past this resident size
    smif_processes: bool = False  # smif jobs as `smif step` processes, not warm workers

    @property
    def scope(self) -> queue.Scope:
        return queue.Scope(self.workflow_id, self.model_run_id)

    @property
    def worker_preload(self) -> tuple[str, ...]:
        return (*workers.default_preload(), *self.preload)


class Runner:
    def __init__(
        self,
        dsn: str | None,
        config: RunnerConfig,
        *,
        transport: DirectTransport | Any = None,
        data: Source | None = None,
    ) -> None:
        """A direct runner from ``dsn``; or one over ``transport`` (smifdb.transport.http's)
        whose files come from ``data``."""
        if transport is None:
            assert dsn is not None
            transport = DirectTransport(dsn, listen=config.listen)
        self.transport = transport
        self.config = config
        self.name = config.name
        self.lock = threading.Lock()
        self.active: dict[int, Attempt] = {}  # attempts whose outcome is not yet known
        self.pending: list[Outcome] = []  # outcomes not yet recorded
        # Python calls released while still running: recorded as the process's last write,
        # since their threads run on until it exits and the job must not run twice at once.
        self.release_at_exit: list[Outcome] = []
        self.busy = 0  # pool threads in use (a stopped Python attempt keeps its thread)
        self.counts = {"succeeded": 0, "failed": 0, "claimed": 0}  # since the last heartbeat
        self.total = {"succeeded": 0, "failed": 0, "claimed": 0}
        self.wake = threading.Event()  # main loop: work may be ready or an attempt ended
        self.check_now = threading.Event()  # heartbeat: a cancellation arrived
        self.stopping = threading.Event()
        self.closed = threading.Event()
        self.stop_deadline: float | None = None
        self.workflow_done: str | None = None
        self.todo: queue_mod.SimpleQueue[Attempt | None] = queue_mod.SimpleQueue()
        self.workers = [
            threading.Thread(target=self._work, name=f"slot-{i}", daemon=True)
            for i in range(config.slots)
        ]
        self.conn: Channel | None = None  # the main loop's channel
        self.host, self.pid = socket.gethostname(), os.getpid()  # who holds the name
        self.name_taken = False  # another process started under our name while we were silent
        self.token_refused = False  # the API refused our token for dead_after: stopped
        self.watchdog = Watchdog()
        # Jobs' files: the cache and the attempts' folders share one file system (hard links);
        # data connections open only once a job has files.
        self.files = JobFiles(
            data if data is not None else dsn,  # type: ignore[arg-type]
            Cache(config.cache_dir, config.cache_max_bytes),
            config.cache_dir / "work",
            max_file_bytes=config.max_file_bytes,
        )
        self.python_workers = None
        if not config.python_in_thread:
            self.python_workers = workers.WorkerPool(
                config.python_allow,
                preload=config.worker_preload,
                max_jobs=config.worker_max_jobs,
                max_memory=config.worker_max_memory,
            )
        self.policy = JobPolicy(
            python_allow=config.python_allow,
            max_result_bytes=config.max_result_bytes,
            max_log_bytes=config.max_log_bytes,
            workers=self.python_workers,
            smif_processes=config.smif_processes,
        )
        self.backoff = Backoff()
        self.retry_at = 0.0
        self.on_tick: Callable[[], None] | None = None
        self.pending_since = 0.0
        self.next_retry_check = 0.0  # when to ask the database for the next retry time
        self.next_retry_due = float("inf")
        # Claims (leases) with attempts not yet recorded, and those to close: all recorded.
        self.claim_left: dict[int, int] = {}
        self.closing: list[int] = []
        # Workflows whose counts our last commit raised without seeing them complete: checked
        # by the next cycle, or before waiting (queue.FinishReport.unsettled).
        self.unsettled: set[int] = set()
        self.cycled_at = 0.0  # when the last cycle committed (monotonic)
        self.next_deadline = float("inf")  # no attempt times out before this (monotonic)
        self.beat_at: float | None = None  # when our last heartbeat was written (monotonic)
        self.held_back = False  # not claiming for want of a fresh heartbeat
        self.warned_stale = False  # ... and said so

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or idle/finished, as configured). Returns an exit status."""
        self.config.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.python_workers is not None and (self.config.model_run_id or self.config.preload):
            workers.prestart(self.config.worker_preload)  # its jobs all need a worker
        self._connect_main()
        assert self.conn is not None
        # Jobs still leased to this name belong to a dead earlier process of the same name.
        self.name, report = self.conn.register(
            self.name,
            host=self.host,
            pid=self.pid,
            slots=self.config.slots,
            dead_after=self.config.dead_after,
            max_losses=self.config.max_runner_losses,
        )
        if report.recorded:
            log.info(
                "took back %d job(s) from an earlier runner named %s",
                len(report.recorded),
                self.name,
                extra={"runner": self.name},
            )
            logs.taken_back(log, report.taken, "rescued")
        log.info(
            "runner %s started with %d slot(s)",
            self.name,
            self.config.slots,
            extra={"runner": self.name, "slots": self.config.slots},
        )
        threads = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)]
        if hasattr(self.transport, "api"):  # an HTTP runner: long polls for work
            # Not joined at exit: its request may wait WAIT seconds, and it ends by itself.
            threading.Thread(target=self._wait_loop, name="wait", daemon=True).start()
        for t in threads + self.workers:
            t.start()
        try:
            self._main_loop()
        except BaseException:
            log.exception("runner %s failed; handing its jobs back", self.name)
            self._release_all()
            raise
        finally:
            self._shutdown(threads)
        return 1 if self.name_taken or self.token_refused else 0

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
                extra={
                    "runner": self.name,
                    "grace": 0 if self.stopping.is_set() else self.config.grace,
                },
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
        # Heartbeat thread first: a beat in flight would mark the runner draining again.
        self.closed.set()
        self.check_now.set()
        for t in threads:
            t.join(timeout=5)
        with contextlib.suppress(*ERRORS):
            if self.conn is not None:
                with self.lock:
                    counts = self._take_counts()
                self.conn.beat(self.name, self.host, self.pid, counts)
                if self.release_at_exit:  # before `stopped`, which would let peers rescue them
                    batch = self.release_at_exit
                    report = self.conn.cycle(self.name, batch, defer_settle=False)
                    self._recorded(batch, report)
                self._settle(now=True)
            if self.conn is not None:
                self.conn.set_state(self.name, self.host, self.pid, "stopped")
        for _ in self.workers:
            self.todo.put(None)
        self.watchdog.close()
        if self.python_workers is not None:
            self.python_workers.close()
        self.files.close()
        if self.conn is not None:
            self.conn.close()
        log.info(
            "runner %s stopped: %d claimed, %d succeeded, %d failed",
            self.name,
            self.total["claimed"],
            self.total["succeeded"],
            self.total["failed"],
            extra={"runner": self.name, **self.total},
        )

    # -- main loop ------------------------------------------------------------------------

    def _main_loop(self) -> None:
        while True:
            self.wake.clear()
            self._enforce_deadlines()
            linger = self._linger()
            if linger > 0:
                self.wake.wait(linger)
                continue
            if self._finished():
                return
            free = 0 if self.stopping.is_set() else self.config.slots - self.busy
            if free > 0 and not self._alive():
                free = 0
            if self.config.batch:
                free = min(free, self.config.batch)
            claimed = self._cycle(free) if (self.pending or free > 0) else 0
            if claimed is None:
                self._sleep_for_reconnect()
                continue
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except (*ERRORS, OSError) as exc:  # a display must never stop the jobs
                    log.debug("progress display failed: %s", exc)
            if free > 0 and claimed == free:
                continue  # more may be ready: claim again as soon as slots free up
            if self.pending:
                continue
            self._settle()
            if self._idle_exit():
                return
            self.wake.wait(self._wait_time())

    def _alive(self) -> bool:
        """Claim only while our heartbeat is fresh: a runner that cannot heartbeat is declared
        lost by its peers after dead_after, and the jobs it claimed, even those that then
        succeed, are taken from it. So the first claim waits for the first heartbeat, and a
        runner whose heartbeat connection is refused (max_connections, a pooler's cap) says
        so and claims nothing until it can heartbeat again."""
        at, now = self.beat_at, time.monotonic()
        dead_after, beat = self.config.dead_after, self.config.heartbeat
        fresh = at is not None and now - at < min(dead_after, max(dead_after / 2, 2 * beat))
        if fresh and self.held_back and at is not None and self.warned_stale:
            log.warning("heartbeat written again: claiming jobs again", extra={"runner": self.name})
            self.warned_stale = False
        elif not fresh and not self.warned_stale and at is not None:
            log.warning(
                "no heartbeat for %.1f s: not claiming jobs until one is written",
                now - at,
                extra={"runner": self.name},
            )
            self.warned_stale = True
        self.held_back = not fresh
        return fresh

    def _linger(self) -> float:
        """Seconds to wait for more attempts to end before recording, batching the writes.

        Record at once when nothing else runs, else LINGER after the first outcome: a chain of
        jobs pays nothing, and a batch of short jobs is written in one transaction, not in
        several as its attempts end. (Recording as soon as half the slots had outcomes cost a
        single runner of 64 no-op slots about 10%: twice the cycles, each ~0.3 ms of psycopg.)
        """
        with self.lock:
            if not self.pending or not self.busy or self.stopping.is_set():
                return 0.0
            age = time.monotonic() - self.pending_since
        return max(LINGER - age, 0.0)

    def _cycle(self, free: int) -> int | None:
        """Record pending outcomes and claim up to ``free`` jobs, in one transaction.

        Returns how many jobs were claimed, or None if the database is unreachable.
        """
        if not self._db_ready():
            return None
        with self.lock:
            batch, self.pending = self.pending, []
        closing, recheck = self.closing, self.unsettled  # cleared once the commit succeeds
        try:
            try:
                assert self.conn is not None
                report = self.conn.cycle(
                    self.name,
                    batch,
                    claim_n=max(free, 0),
                    lease=self.config.lease,
                    scope=self.config.scope,
                    close=closing,
                    recheck=recheck,
                )
                self.closing, self.unsettled = [], report.unsettled
                self.cycled_at = time.monotonic()
            except UNSTORABLE:
                report, batch = self._record_apart(batch)  # each one settled after its commit
        except ERRORS:
            with self.lock:
                self.pending = batch + self.pending
            self._lost_connection()
            return None
        self._recorded(batch, report)
        self._start(report.claimed)
        return len(report.claimed)

    def _settle(self, now: bool = False) -> None:
        """Check the workflows our last commit left unsettled and close recorded claims, in a
        transaction of their own, when no cycle would soon carry them: nothing runs, or the
        last cycle was SETTLE_AFTER ago (long attempts hold the next one back). A runner busy
        with short jobs never pays this extra commit."""
        if not (self.unsettled or self.closing) or self.conn is None:
            return
        with self.lock:
            cycle_coming = bool(self.active or self.pending)
        if cycle_coming and not now and time.monotonic() - self.cycled_at < SETTLE_AFTER:
            return
        try:
            report = self.conn.cycle(self.name, [], close=self.closing, recheck=self.unsettled)
        except ERRORS:
            self._lost_connection()
            return
        self.closing, self.unsettled = [], report.unsettled
        self._ended(report)

    def _finished(self) -> bool:
        """Done once every attempt is recorded (or, past a stop deadline, handed to shutdown).

        A stopped Python attempt is recorded at once (released ones at exit) but keeps its
        thread until the call returns; its slot thread is a daemon and does not hold the exit.
        """
        with self.lock:
            if self.active:
                return False
            recorded = not self.pending
        if self.stopping.is_set():
            if recorded:
                return True
            # Outcomes the database cannot take now: _shutdown tries for a bounded time.
            deadline = self.stop_deadline
            return self.conn is None and deadline is not None and time.monotonic() >= deadline
        return self.workflow_done is not None and recorded

    def _idle_exit(self) -> bool:
        """Exit once idle if asked to, or once our workflow ended (even by a cancel elsewhere)."""
        wf, mr = self.config.workflow_id, self.config.model_run_id
        wanted = self.config.exit_when_idle or wf is not None or mr is not None
        if not wanted or self.active or self.pending or self.conn is None:
            return False
        try:
            if wf is not None or mr is not None:
                self.workflow_done = self.conn.finished(self.config.scope)
                return self.workflow_done is not None
            return not self.conn.anything_unfinished()
        except ERRORS:
            self._lost_connection()
            return False

    def _wait_time(self) -> float:
        wait = self.config.poll * random.uniform(0.8, 1.2)
        now = time.monotonic()
        wait = min(wait, max(self.next_deadline - now, 0) + 0.01)
        if self.unsettled or self.closing:
            wait = min(wait, max(self.cycled_at + SETTLE_AFTER - now, 0) + 0.01)
        if self.stop_deadline is not None:
            wait = min(wait, max(self.stop_deadline - now, 0) + 0.01)
        if self.conn is not None and not self.stopping.is_set():
            if now >= self.next_retry_check:  # at most once a poll interval
                try:
                    due = self.conn.next_retry()
                except ERRORS:
                    self._lost_connection()
                    return min(wait, max(self.retry_at - now, 0.01))
                self.next_retry_due = now + due if due is not None else float("inf")
                self.next_retry_check = now + self.config.poll
            wait = min(wait, max(self.next_retry_due - now, 0) + 0.01)
        return max(wait, 0.001)

    # -- claiming and running -------------------------------------------------------------

    def _start(self, jobs: list) -> None:
        if not jobs:
            return
        attempts = [
            Attempt(
                job, self.name, self.config.log_dir, self.watchdog, self.policy, files=self.files
            )
            for job in jobs
        ]
        for attempt in attempts:
            job = attempt.job
            self.claim_left[job.claim_id] = self.claim_left.get(job.claim_id, 0) + 1
            if attempt.deadline is not None:
                self.next_deadline = min(self.next_deadline, attempt.deadline)
        with self.lock:  # one hand-over for the batch: slots may finish before the last starts
            for attempt in attempts:
                self.active[attempt.job.id] = attempt
            self.busy += len(attempts)
            self.counts["claimed"] += len(attempts)
        self.total["claimed"] += len(attempts)
        verbose = log.isEnabledFor(logging.DEBUG)
        for attempt in attempts:
            if verbose:
                log.debug("job claimed", extra=self._job_fields(attempt.job, "claimed"))
            self.todo.put(attempt)

    def _job_fields(self, job: queue.ClaimedJob, event: str) -> dict:
        return {
            "event": event,
            "workflow_id": job.workflow_id,
            "job_key": job.key,
            "job_id": job.id,
            "attempt": job.attempt,
            "runner": self.name,
            "status": "running",
        }

    def _work(self) -> None:
        """A slot: runs one attempt at a time, outside any database transaction."""
        while (attempt := self.todo.get()) is not None:
            self._execute(attempt)

    def _execute(self, attempt: Attempt) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("job started", extra=self._job_fields(attempt.job, "started"))
        outcome = kinds.run_attempt(attempt)
        with self.lock:
            self.busy -= 1
            # The main loop needs waking for the first outcome (it then lingers for more) and
            # once nothing runs; the outcomes in between are picked up when the linger ends.
            # (Waking it for each of 256 quick attempts cost more than the attempts.)
            wake = not self.pending or not self.busy
            if self.active.get(attempt.job.id) is attempt:
                del self.active[attempt.job.id]
                self._add_pending(outcome)
        if wake:
            self.wake.set()

    def _report_now(self, attempt: Attempt) -> None:
        """Record a stopped Python attempt without waiting for its thread (it cannot be killed):
        a timeout or cancel at once, a release when the runner exits."""
        with self.lock:
            if self.active.get(attempt.job.id) is attempt:
                del self.active[attempt.job.id]
                outcome = attempt.stopped_outcome()
                if outcome.status == "released":
                    self.release_at_exit.append(outcome)
                else:
                    self._add_pending(outcome)
        self.wake.set()

    def _add_pending(self, outcome: Outcome) -> None:
        """Caller holds the lock."""
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(outcome)

    def _stop_attempt(self, attempt: Attempt, reason: str) -> None:
        if not kinds.stop(attempt, reason):  # nothing can end it (a Python call's thread)
            self._report_now(attempt)

    def _enforce_deadlines(self) -> None:
        """Stop attempts past their timeout, and all of them past the stop deadline.

        Scans the attempts only once the earliest deadline has come (every wake of the main
        loop would otherwise cost a pass over all running attempts).
        """
        now = time.monotonic()
        stop_due = self.stop_deadline is not None and now >= self.stop_deadline
        if now < self.next_deadline and not stop_due:
            return
        with self.lock:
            attempts = list(self.active.values())
        next_deadline = float("inf")
        for attempt in attempts:
            deadline = attempt.deadline
            if deadline is None or attempt.stop_reason:
                continue
            if now >= deadline:
                self._stop_attempt(attempt, "timeout")
            else:
                next_deadline = min(next_deadline, deadline)
        self.next_deadline = next_deadline
        if stop_due:
            for attempt in attempts:
                if not attempt.stop_reason:
                    self._stop_attempt(attempt, "released")

    # -- recording ------------------------------------------------------------------------

    def _flush(self) -> bool:
        """Record pending outcomes (claiming nothing); False if the database is unreachable."""
        return self._cycle(0) is not None

    def _recorded(self, batch: list[Outcome], report: queue.FinishReport) -> None:
        """After the commit: every outcome of ``batch`` is written or was fenced out, so none
        of its jobs runs under its claim any more (a claim with all its outcomes here closes)."""
        recorded = set(report.recorded)
        verbose = log.isEnabledFor(logging.INFO)
        for outcome in batch:
            left = self.claim_left.get(outcome.claim_id, 0) - 1
            if left > 0:
                self.claim_left[outcome.claim_id] = left
            elif self.claim_left.pop(outcome.claim_id, None) is not None:
                self.closing.append(outcome.claim_id)
            if outcome.job_id not in recorded:
                log.warning(
                    "outcome of job %d attempt %d was not recorded: the lease had moved on",
                    outcome.job_id,
                    outcome.attempt,
                    extra=logs.job_fields(outcome, "not_recorded"),
                )
                continue
            if outcome.status in ("succeeded", "failed"):
                with self.lock:
                    self.counts[outcome.status] += 1
                    self.total[outcome.status] += 1
            if verbose:
                logs.job_event(log, outcome, "retried" if outcome.retries else outcome.status)
        if any(o.retries for o in batch):
            self.next_retry_check = 0.0  # a retry of ours is due soon: look it up next wait
        self._ended(report)

    def _ended(self, report: queue.FinishReport) -> None:
        wf = self.config.workflow_id
        if wf is not None and wf in report.finished_workflows:
            self.workflow_done = report.finished_workflows[wf]

    def _record_apart(self, batch: list[Outcome]) -> tuple[queue.FinishReport, list[Outcome]]:
        """PostgreSQL refused the batch as data: record each outcome alone, and one it refuses
        again without its result and log, so that it fails alone and the runner lives on.
        (Results are checked when attempts end; this is for whatever that check misses.)"""
        assert self.conn is not None
        total, written = queue.FinishReport(), []
        for outcome in batch:
            try:
                report = self.conn.cycle(self.name, [outcome], defer_settle=False)
            except UNSTORABLE as exc:
                diag = getattr(exc, "diag", None)
                detail = (diag.message_primary if diag is not None else None) or exc
                why = f"the outcome could not be stored: {detail}"
                log.error(
                    "job %d: %s", outcome.job_id, why, extra=logs.job_fields(outcome, "unstorable")
                )
                outcome = outcome.without_data(why)
                report = self.conn.cycle(self.name, [outcome], defer_settle=False)
            written.append(outcome)
            total.recorded += report.recorded
            total.finished_workflows.update(report.finished_workflows)
        return total, written

    def _take_counts(self) -> dict[str, int]:
        """Caller holds the lock."""
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    # -- connection -----------------------------------------------------------------------

    def _connect_main(self) -> None:
        """First connection: errors here are the caller's (bad DSN, unmigrated schema...)."""
        self.conn = self._connect()

    def _db_ready(self) -> bool:
        if self.conn is not None and not self.conn.closed:
            return True
        if time.monotonic() < self.retry_at:
            return False
        try:
            self.conn = self._connect()
            released = self.conn.reconnect(self.name, self.host, self.pid, self._known_job_ids())
            if released is None:
                # Cut off past dead_after, and another process took the name: the jobs leased
                # to it now are that process's, not ours to hand back.
                self._name_taken()
                return True
        except ERRORS as exc:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            self.retry_at = time.monotonic() + self.backoff.next()
            log.debug("database still unreachable: %s", exc)
            return False
        log.warning("reconnected to the %s", self._where)
        logs.taken_back(log, released.taken, "released")
        self.backoff.reset()
        return True

    def _known_job_ids(self) -> list[int]:
        with self.lock:
            return list(self.active) + [o.job_id for o in self.pending]

    def _lost_connection(self) -> None:
        if self.conn is not None:
            log.warning(
                "lost the %s connection; running jobs continue, results are kept", self._where
            )
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None
        self.retry_at = time.monotonic() + self.backoff.next()

    def _sleep_for_reconnect(self) -> None:
        self._enforce_deadlines()
        self.wake.wait(max(self.retry_at - time.monotonic(), 0.05))

    # -- heartbeat ------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return "API" if hasattr(self.transport, "api") else "database"

    def _heartbeat_loop(self) -> None:
        conn: Channel | None = None
        backoff = Backoff()
        up_since = 0.0
        failing = False
        next_rescue = time.monotonic() + self.config.heartbeat * random.uniform(1, 3)
        while not self.closed.is_set():
            self.watchdog.revive()  # whether or not the database answers
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                    if isinstance(conn, DirectChannel) and self.transport.listens:
                        conn.listen()
                        self.wake.set()  # anything could have happened while we were not listening
                    up_since = time.monotonic()
                    backoff.reset()
                self._beat(conn)
                if failing:
                    log.warning("heartbeat connection restored", extra={"runner": self.name})
                    failing = False
                # Rescue only after being connected for dead_after: after an outage, peers
                # need that long to heartbeat again before they can be told apart from the dead.
                now = time.monotonic()
                if now >= next_rescue and now - up_since >= self.config.dead_after:
                    self._rescue(conn)
                    next_rescue = now + self.config.heartbeat * random.uniform(3, 6)
                if isinstance(conn, DirectChannel) and self.transport.listens:
                    self._hear(conn, time.monotonic() + self.config.heartbeat)
                    continue
                wait = self.config.heartbeat
            except ERRORS as exc:
                if isinstance(exc, Refused):
                    self._refused()
                if not failing:
                    log.warning(
                        "cannot heartbeat: %s; claiming no jobs until it can (running ones go on)",
                        _first_line(exc),
                        extra={"runner": self.name},
                    )
                    failing = True
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                wait = backoff.next()
            self.check_now.wait(wait)
            self.check_now.clear()
        if conn is not None:
            conn.close()

    def _hear(self, conn: DirectChannel, until: float) -> None:
        """Until the next beat: wake the main loop on each notification; a cancel, or a stop,
        ends the wait (the next beat stops the cancelled attempts). Checks for a stop every
        0.25 s, since notifies() cannot wait on an Event."""
        while not self.closed.is_set() and not self.check_now.is_set():
            left = until - time.monotonic()
            if left <= 0:
                break
            for channel in conn.hear(min(left, 0.25)):
                self.wake.set()
                if channel == CANCEL_CHANNEL:
                    return
        self.check_now.clear()

    def _connect(self) -> Channel:
        return self.transport.connect()

    def _wait_loop(self) -> None:
        """An HTTP runner's ear: the API's wait answers when work may be ready (its one LISTEN
        heard of it), and this wakes the main loop, as a direct runner's LISTEN does."""
        after: str | None = None
        backoff = Backoff()
        while not self.closed.is_set():
            try:
                answer = self.transport.connect().wait(after, WAIT)
            except ERRORS:
                self.closed.wait(backoff.next())
                after = None
                continue
            backoff.reset()
            after = answer["token"]
            if answer["woken"]:
                self.wake.set()
            if answer["cancel"]:
                self.check_now.set()

    def _beat(self, conn: Channel) -> None:
        with self.lock:
            counts = self._take_counts()
            attempts = dict(self.active)
        try:
            beat = conn.beat(
                self.name,
                self.host,
                self.pid,
                counts,
                draining=self.stopping.is_set(),
                job_ids=sorted(attempts),
                lease=self.config.lease,
            )
        except ERRORS:
            with self.lock:
                for key, n in counts.items():
                    self.counts[key] += n
            raise
        if not beat.ours:
            self._name_taken()
            return
        first, self.beat_at = self.beat_at is None, time.monotonic()
        if first or self.held_back:
            self.wake.set()  # the main loop may claim now
        for job_id in beat.cancel:
            attempt = attempts[job_id]
            if not attempt.stop_reason:
                log.info(
                    "cancelling job %d on request",
                    job_id,
                    extra=self._job_fields(attempt.job, "cancelling"),
                )
                self._stop_attempt(attempt, "cancelled")

    def _refused(self) -> None:
        """The API refuses our token (revoked, expired): once that has lasted dead_after our
        jobs are being rescued by peers, so stop; nothing we record would be accepted."""
        since = getattr(self.transport.api, "refused_since", None)
        if since is None or time.monotonic() - since < self.config.dead_after:
            return
        if not self.token_refused:
            log.error(
                "the API has refused this runner's token for %.0f s: stopping",
                time.monotonic() - since,
                extra={"runner": self.name},
            )
        self.token_refused = True
        self.request_stop(immediate=True)

    def _name_taken(self) -> None:
        """Another process runs under our name: it has taken back the jobs we held when it
        started, so stop now. Releasing what we claimed since is still fenced per claim."""
        if not self.name_taken:
            log.error(
                "runner name %s was taken over by another process while this one was silent;"
                " stopping",
                self.name,
                extra={"runner": self.name},
            )
        self.name_taken = True
        self.request_stop(immediate=True)

    def _rescue(self, conn: Channel) -> None:
        lost, report = conn.rescue(
            self.name, dead_after=self.config.dead_after, max_losses=self.config.max_runner_losses
        )
        if lost:
            log.warning("runner(s) %s stopped heartbeating", ", ".join(lost))
        if report.recorded:
            log.warning("rescued %d job(s) from dead runners", len(report.recorded))
            logs.taken_back(log, report.taken, "rescued")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
