"""The manager: moves model runs from one decision bundle to the next.

Stateless by construction. Each step is one transaction that locks one *due* model run (its
newest fragment has finished) with SKIP LOCKED, rebuilds its decider from the row, hands it the
finished bundles' history read from the tables, and either submits the next fragment or ends
the model run. A manager killed mid-step leaves nothing: its transaction rolls back, the lock
goes with its connection, and any other manager (or the same one restarted) redoes the step.
Any number may run at once; the unique (model_run_id, bundle) constraint makes a duplicate
bundle impossible, whatever the timing.

Managers also rescue jobs from dead runners (expired leases, stale heartbeats), so a queue with
only dead runners is still cleaned up once a runner comes back.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from smifdb import db, logs, snapshot, store
from smifdb.db import DB_ERRORS, Backoff
from smifdb.decisions import (
    DeciderUnavailable,
    DecisionError,
    ModelRunError,
    PythonDecider,
    SnapshotDecider,
    decider_for,
    project_dir,
)
from smifdb.store import FINISHED_CHANNEL, blobs, modelruns, queue
from smifdb.store import runners as runner_rows
from smifdb.store.modelruns import ModelRun

log = logging.getLogger(__name__)


@dataclass
class ManagerConfig:
    name: str = field(default_factory=lambda: store.actor_name("manager"))
    poll: float = 2.0  # seconds between looks when no notification arrives
    dead_after: float = 30.0  # a runner silent this long is dead; its jobs are rescued
    housekeeping: bool = True
    model_run_id: int | None = None  # only this model run (``modelrun run``)


class Manager:
    def __init__(self, dsn: str, config: ManagerConfig) -> None:
        self.dsn = dsn
        self.config = config
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.on_model_run_end: Callable[[int, str], None] | None = None
        self.skipped: set[int] = set()  # model runs this process cannot decide (no smif)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Step until stopped, waking on finished workflows or every poll interval."""
        log.info("manager %s started", self.config.name, extra={"manager": self.config.name})
        conn: psycopg.Connection | None = None
        up_since = 0.0
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.dsn, connect_timeout=5)
                    store.listen(conn, FINISHED_CHANNEL)
                    up_since = time.monotonic()
                    backoff.reset()
                connected_for = time.monotonic() - up_since
                self.step(conn, rescue=connected_for >= self.config.dead_after)
                self._wait(conn)
            except DB_ERRORS as exc:
                delay = backoff.next()
                log.warning("database unreachable (%s); retrying in %.1f s", exc, delay)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                self.stopping.wait(delay)
        if conn is not None:
            conn.close()
        log.info("manager %s stopped", self.config.name, extra={"manager": self.config.name})
        return 0

    def request_stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _wait(self, conn: psycopg.Connection) -> None:
        """Until a workflow finishes, someone calls wake(), or a jittered poll interval."""
        deadline = time.monotonic() + self.config.poll * random.uniform(0.8, 1.2)
        while not self.stopping.is_set() and not self.wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if any(True for _ in conn.notifies(timeout=min(left, 0.2), stop_after=1)):
                break
        self.wake.clear()

    # -- one step -------------------------------------------------------------------------

    def step(self, conn: psycopg.Connection, *, rescue: bool = True) -> int:
        """Housekeeping, then advance every due model run. Returns how many were advanced."""
        if rescue and self.config.housekeeping:
            self._housekeeping(conn)
        advanced = 0
        while not self.stopping.is_set() and self.advance_one(conn):
            advanced += 1
        return advanced

    def _housekeeping(self, conn: psycopg.Connection) -> None:
        lost = runner_rows.mark_lost(conn, self.config.dead_after)
        if lost:
            log.warning("runner(s) %s stopped heartbeating", ", ".join(lost))
        report = queue.rescue(conn, self.config.name, dead_after=self.config.dead_after)
        if report.recorded:
            log.warning("rescued %d job(s) from dead runners", len(report.recorded))
            logs.taken_back(log, report.taken, "rescued")

    def advance_one(self, conn: psycopg.Connection) -> bool:
        """Lock one due model run and move it on, in one transaction. False if none is due."""
        model_run = None
        try:
            with conn.transaction():
                model_run = modelruns.lock_due(
                    conn, only=self.config.model_run_id, skip=sorted(self.skipped)
                )
                if model_run is None:
                    return False
                ended = advance(conn, model_run, actor=self.config.name)
        except DeciderUnavailable as exc:
            assert model_run is not None
            log.warning(
                "cannot decide model run %d here: %s",
                model_run.id,
                exc,
                extra={"model_run_id": model_run.id},
            )
            self.skipped.add(model_run.id)
            return True
        if ended is not None and self.on_model_run_end is not None:
            self.on_model_run_end(model_run.id, ended)
        return True


def advance(conn: psycopg.Connection, model_run: ModelRun, *, actor: str) -> str | None:
    """Within the caller's transaction, with ``model_run`` locked and due: submit its next
    fragment or end it. Returns the final status if it ended."""
    last = modelruns.last_fragment(conn, model_run.id)
    if last is not None and last[2] != "succeeded":
        bundle, workflow_id, status = last
        ended = "cancelled" if status == "cancelled" else "failed"
        reason = f"bundle {bundle} (workflow {workflow_id}) {status}"
        modelruns.finish(conn, model_run.id, ended, actor=actor, reason=reason, error=reason)
        log.info(
            "model run %d %s: %s",
            model_run.id,
            ended,
            reason,
            extra={"model_run_id": model_run.id, "workflow_id": workflow_id, "status": ended},
        )
        return ended
    history = modelruns.History(conn, model_run.id, model_run.bundles)
    try:
        decider = decider_for(model_run, conn)
        dag = decider.next_bundle(history)
        decider.record(conn)  # decision states, with the bundle they lead to (or the end)
    except DeciderUnavailable:
        raise
    except (ModelRunError, DecisionError) as exc:
        modelruns.finish(conn, model_run.id, "failed", actor=actor, reason=str(exc), error=str(exc))
        log.warning(
            "model run %d failed: %s",
            model_run.id,
            exc,
            extra={"model_run_id": model_run.id, "status": "failed"},
        )
        return "failed"
    if dag is None:
        reason = f"decision loop ended after {len(history)} bundle(s)"
        modelruns.finish(conn, model_run.id, "succeeded", actor=actor, reason=reason)
        log.info(
            "model run %d succeeded: %s",
            model_run.id,
            reason,
            extra={"model_run_id": model_run.id, "status": "succeeded"},
        )
        return "succeeded"
    workflow_id = modelruns.submit_bundle(
        conn, model_run, len(history), dag, actor=actor, decider_state=decider.state
    )
    log.info(
        "model run %d: bundle %d submitted as workflow %d (%d jobs)",
        model_run.id,
        len(history),
        workflow_id,
        len(dag.jobs),
        extra={"model_run_id": model_run.id, "bundle": len(history), "workflow_id": workflow_id},
    )
    return None


def submit_model_run(
    conn: psycopg.Connection,
    project: str | Path,
    name: str,
    *,
    actor: str,
    decide: str | None = None,
    warm: bool = False,
    priority: int = 0,
    interface: str = "local_csv",
    in_process: bool = False,
    shared_project: bool = False,
    submitted_by: int | None = None,
) -> tuple[int, int]:
    """Record a model run and submit its first bundle, all in one transaction.

    A smif run is snapshotted first (unless ``shared_project``): the project's files are
    uploaded, each blob in a transaction of its own (what is stored already is not sent
    again), and the model run's manifest is written with the run. ModelRunError or
    DecisionError if the project, the model run or its decision module is unusable; then no
    model run is written (blobs uploaded before stay unreferenced, for prune). Returns
    (model run id, first workflow id).
    """
    folder = project_dir(project)
    entries: list = []
    if decide is not None:
        decider: Any = PythonDecider(decide, folder, name)
        kind, options = "python", {}
    else:
        from smifdb.smifrun import SmifModelRun

        # Checked in the submitter's folder first: a bad project is refused before uploading.
        decider = SmifModelRun.open(
            folder,
            name,
            interface=interface,
            warm=warm,
            in_process=in_process,
            shared_project=shared_project,
        )
        kind = "smif"
        options = {
            "interface": interface,
            "warm": warm,
            "in_process": in_process,
            "shared_project": shared_project,
        }
        if not shared_project:
            entries = snapshot.upload(conn, folder)
    with conn.transaction():
        model_run_id = modelruns.create(
            conn,
            name=name,
            kind=kind,
            project_dir=str(folder),
            decide=decide,
            options=options,
            priority=priority,
            actor=actor,
            submitted_by=submitted_by,
        )
        if entries:
            blobs.add_model_run_files(conn, model_run_id, entries)
            model_run = modelruns.get(conn, model_run_id)
            if warm and (previous := modelruns.previous(conn, model_run)) is not None:
                # Its results by reference: the same blobs under the same paths.
                done = modelruns.result_files(conn, previous)
                blobs.add_model_run_files(conn, model_run_id, done)
            decider = SnapshotDecider(conn, model_run)
        if kind == "smif":  # only now that no live run of this name can be clobbered
            modelruns.set_options(conn, model_run_id, decider.prepare())
        dag = decider.next_bundle([])
        if dag is None:
            raise DecisionError(f"the decision module of {name!r} gave no first bundle")
        decider.record(conn)
        model_run = modelruns.get(conn, model_run_id)
        workflow_id = modelruns.submit_bundle(
            conn, model_run, 0, dag, actor=actor, decider_state=decider.state
        )
    return model_run_id, workflow_id
