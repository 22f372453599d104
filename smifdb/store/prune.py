"""Retention: delete finished workflows and model runs older than a cutoff, with all their rows.

A workflow can go once it finished before the cutoff, unless it is a bundle of a model run: a
bundle goes only with its whole model run, once that run finished before the cutoff and every
one of its bundles did too (a running model run's history is its decision input). Unfinished
workflows are never touched. Events, claims and workflow counts have no foreign keys, so they
are deleted explicitly by workflow_id (which covers job events) and by model_run_id. The files
records name (workflow_files, job_outputs, model_run_files) go explicitly too, before their
owners and in the same transactions; the blobs they named go last, once nothing names them and
nobody used them within the blob grace period (smifdb.store.blobs.delete_unreferenced).

Work is done in short transactions of at most ``batch_size`` workflows and ``max_jobs`` jobs (a
bigger workflow loses its jobs over several transactions, its row last). Each transaction locks
its workflow rows FOR UPDATE SKIP LOCKED, which re-checks the conditions under the lock and never
waits: a row someone holds is left for the next prune. Nobody else writes a finished workflow's
rows, so runners and managers never wait for a prune either. Every delete is index-driven.
Standalone workflows are found by a keyset walk in id order, with no index on finished_at: the
planner follows workflows_pkey while old rows are many and scans the table (about 60 ms per
million rows) when they are few; bundles are found through their model runs.

With an archive, each transaction's deleted events are appended to a JSON Lines file and
fsynced before that transaction commits: an event is never deleted without being archived.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import psycopg

from smifdb.store import blobs
from smifdb.store.queue import array

MAX_JOBS = 20_000  # jobs deleted per transaction, at most
MAX_DURATION = timedelta(days=36_500)
# An unreferenced blob younger than this is kept: it may be an upload whose record (a workflow
# being submitted, a job's outputs) is about to commit.
BLOB_GRACE = timedelta(hours=1)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(?:\d+[smhdw])+", re.ASCII)
_PART = re.compile(r"(\d+)([smhdw])", re.ASCII)


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w', or a sum of them such as '1d12h'."""
    value = text.strip()
    if not _DURATION.fullmatch(value):
        raise ValueError(
            f"{text!r} is not a duration: use whole numbers with a unit s, m, h, d or w, "
            "e.g. 30d, 12h, 90m, 45s, 2w or 1d12h"
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


# -- which rows may go ------------------------------------------------------------------

_CUTOFF = "SELECT now() - %s::interval"

# Workflows that are not bundles of a model run, finished before the cutoff: a keyset walk
# over workflows_pkey (each batch starts after the last id of the one before).
_WORKFLOWS = """
SELECT w.id, w.job_count FROM workflows w
WHERE w.id > %(after)s AND w.finished_at < %(cutoff)s AND w.model_run_id IS NULL
ORDER BY w.id
LIMIT %(limit)s
"""
# The bundles of some expired model runs. The ARRAY(...) is computed first, through
# workflows_model_run_bundle_key, so the walk never reads other workflows' rows.
_BUNDLES = """
SELECT w.id, w.job_count FROM workflows w
WHERE w.id = ANY(ARRAY(
        SELECT id FROM workflows WHERE model_run_id = ANY(%(model_runs)s::bigint[])))
  AND w.id > %(after)s AND w.finished_at < %(cutoff)s
ORDER BY w.id
LIMIT %(limit)s
"""
# FOR UPDATE (not NO KEY UPDATE): the rows are about to be deleted. SKIP LOCKED: never wait.
# Under the lock PostgreSQL re-checks the WHERE clause against the row's current version.
_LOCK = "FOR UPDATE OF w SKIP LOCKED"
LOCK_WORKFLOWS = _WORKFLOWS + _LOCK
LOCK_BUNDLES = _BUNDLES + _LOCK
SELECT_WORKFLOWS = _WORKFLOWS  # --dry-run: the same rows, unlocked
SELECT_BUNDLES = _BUNDLES

# Model runs that ended before the cutoff (a keyset walk over model_runs_pkey), each with
# whether it is expired: every one of its bundles ended before the cutoff too. A model run
# that is still running, or was cancelled while a bundle still runs, keeps all its bundles.
# Once expired, always expired: an ended model run gets no new bundles. (LATERAL … LIMIT 1
# keeps each check a probe of workflows_model_run_bundle_key; a plain NOT EXISTS may become a
# hashed subplan over the whole workflows table, once per batch.)
MODEL_RUNS = """
SELECT m.id, live.id IS NULL FROM model_runs m
LEFT JOIN LATERAL (
    SELECT w.id FROM workflows w
    WHERE w.model_run_id = m.id AND (w.finished_at IS NULL OR w.finished_at >= %(cutoff)s)
    LIMIT 1
) live ON true
WHERE m.id > %(after)s AND m.finished_at < %(cutoff)s
ORDER BY m.id
LIMIT %(limit)s
"""
# Expired model runs, locked, each with whether a bundle is left (one held by someone else).
LOCK_MODEL_RUNS = """
SELECT m.id, left_over.id IS NOT NULL FROM model_runs m
LEFT JOIN LATERAL (SELECT w.id FROM workflows w WHERE w.model_run_id = m.id LIMIT 1) left_over
    ON true
WHERE m.id = ANY(%(ids)s::bigint[])
ORDER BY m.id
FOR UPDATE OF m SKIP LOCKED
"""

# -- deleting ---------------------------------------------------------------------------

_EVENT_COLUMNS = (
    "id, at, workflow_id, model_run_id, job_id, from_status, to_status, attempt, actor, reason,"
    " claimed_at, claimed_by"
)
# Whole workflows: their events (workflow, job and bundle events alike) by workflow_id.
DELETE_WORKFLOW_EVENTS = "DELETE FROM events WHERE workflow_id = ANY(%(ids)s::bigint[])"
# Edges never cross workflows, so every edge of these jobs has its parent among them.
DELETE_WORKFLOW_EDGES = """
DELETE FROM job_edges WHERE parent_id = ANY(ARRAY(
    SELECT id FROM jobs WHERE workflow_id = ANY(%(ids)s::bigint[])))
"""
DELETE_WORKFLOW_JOBS = "DELETE FROM jobs WHERE workflow_id = ANY(%(ids)s::bigint[])"
# The files they name (their blobs stay until prune_blobs finds them unreferenced).
DELETE_WORKFLOW_FILES = "DELETE FROM workflow_files WHERE workflow_id = ANY(%(ids)s::bigint[])"
DELETE_WORKFLOW_OUTPUTS = """
DELETE FROM job_outputs WHERE job_id = ANY(ARRAY(
    SELECT id FROM jobs WHERE workflow_id = ANY(%(ids)s::bigint[])))
"""
DELETE_WORKFLOWS = "DELETE FROM workflows WHERE id = ANY(%(ids)s::bigint[])"
# A finished workflow's leases (all closed) and finished counts go with its row.
DELETE_WORKFLOW_CLAIMS = "DELETE FROM claims WHERE workflow_id = ANY(%(ids)s::bigint[])"
DELETE_WORKFLOW_COUNTS = "DELETE FROM workflow_counts WHERE workflow_id = ANY(%(ids)s::bigint[])"

# Part of one big workflow: some of its jobs, with their events and edges in both directions.
SOME_JOBS = "SELECT id FROM jobs WHERE workflow_id = %(id)s LIMIT %(limit)s"
DELETE_JOB_EVENTS = (
    "DELETE FROM events WHERE workflow_id = %(id)s AND job_id = ANY(%(jobs)s::bigint[])"
)
DELETE_JOB_EDGES = """
WITH out AS (DELETE FROM job_edges WHERE parent_id = ANY(%(jobs)s::bigint[]) RETURNING 1),
     inc AS (DELETE FROM job_edges WHERE child_id = ANY(%(jobs)s::bigint[]) RETURNING 1)
SELECT (SELECT count(*) FROM out) + (SELECT count(*) FROM inc)
"""
DELETE_JOBS = "DELETE FROM jobs WHERE id = ANY(%(jobs)s::bigint[])"
DELETE_JOB_OUTPUTS = "DELETE FROM job_outputs WHERE job_id = ANY(%(jobs)s::bigint[])"

# A model run's own events (its bundles' events went with the bundles).
DELETE_MODEL_RUN_EVENTS = "DELETE FROM events WHERE model_run_id = ANY(%(ids)s::bigint[])"
DELETE_MODEL_RUN_FILES = "DELETE FROM model_run_files WHERE model_run_id = ANY(%(ids)s::bigint[])"
DELETE_MODEL_RUNS = "DELETE FROM model_runs WHERE id = ANY(%(ids)s::bigint[])"

# -- counting (--dry-run) ---------------------------------------------------------------

COUNT_WORKFLOW_ROWS = """
SELECT (SELECT count(*) FROM jobs WHERE workflow_id = ANY(%(ids)s::bigint[])),
       (SELECT count(*) FROM job_edges WHERE parent_id = ANY(ARRAY(
            SELECT id FROM jobs WHERE workflow_id = ANY(%(ids)s::bigint[])))),
       (SELECT count(*) FROM events WHERE workflow_id = ANY(%(ids)s::bigint[]))
"""
# A model run's own events; those of its bundles are counted with the bundles.
COUNT_MODEL_RUN_EVENTS = """
SELECT count(*) FROM events WHERE model_run_id = ANY(%(ids)s::bigint[]) AND workflow_id IS NULL
"""


@dataclass
class PruneReport:
    """What a prune deleted (or, with dry_run, would delete)."""

    cutoff: datetime
    dry_run: bool = False
    workflows: int = 0
    model_runs: int = 0
    jobs: int = 0
    edges: int = 0
    events: int = 0
    archived: int = 0
    blobs: int = 0  # unreferenced blobs, and their bytes
    blob_bytes: int = 0
    transactions: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        line = (
            f"{verb} {self.workflows:,} workflow(s) and {self.model_runs:,} model run(s) "
            f"finished before {self.cutoff:%Y-%m-%d %H:%M:%S %Z}: {self.jobs:,} jobs, "
            f"{self.edges:,} edges, {self.events:,} events in {self.seconds:.2f} s"
        )
        if not self.dry_run:
            line += f" ({self.transactions:,} transactions)"
        line += f"; {verb} {self.blobs:,} unreferenced blob(s), {self.blob_bytes:,} bytes"
        if self.dry_run:
            line += " (unreferenced now, before the records above go)"
        return line


class ArchiveInUse(RuntimeError):
    """Another prune is appending to the same archive file."""


class EventArchive:
    """Deleted events, appended to a JSON Lines file (one object per event, with its id).

    ``write`` returns only once the lines are on disk (fsync), and prune calls it before the
    transaction that deleted those events commits. A crash between the two leaves the events in
    the database, so the next prune appends them again: an event may appear twice (same id),
    never not at all. A torn last line (a crash mid-write, whose batch therefore never committed)
    is cut off when the file is next opened. An exclusive lock keeps two prunes from interleaving.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn_bytes = 0  # cut off a previous, interrupted write
        self._file: IO[bytes] | None = None

    def __enter__(self) -> EventArchive:
        if self._file is None:
            self.open()
        return self

    def open(self) -> None:
        """Open for appending, locked; raises OSError or ArchiveInUse."""
        created = not self.path.exists()
        f = open(self.path, "a+b")  # noqa: SIM115 - closed in __exit__
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            f.close()
            raise ArchiveInUse(f"{self.path} is being written by another prune") from exc
        self._file = f
        self._cut_torn_line()
        if created:  # make the new file's name durable too
            fd = os.open(self.path.resolve().parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _cut_torn_line(self) -> None:
        f = self._file
        assert f is not None
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65_536)
            f.seek(start)
            block = f.read(pos - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        if pos < end:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
            self.torn_bytes = end - pos

    def write(self, rows: list[tuple]) -> None:
        """Append events (rows of _EVENT_COLUMNS) in id order, and fsync."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open: events would be deleted unarchived")
        if not rows:
            return
        names = _EVENT_COLUMNS.split(", ")
        lines = []
        for row in sorted(rows):
            event = dict(zip(names, row, strict=True))
            event["at"] = event["at"].isoformat()
            if event["claimed_at"] is not None:
                event["claimed_at"] = event["claimed_at"].isoformat()
            lines.append(json.dumps(event, separators=(",", ":")) + "\n")
        self._file.write("".join(lines).encode())
        self._file.flush()
        os.fsync(self._file.fileno())


def prune(
    conn: psycopg.Connection,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    archive: EventArchive | None = None,
    batch_size: int = 100,
    max_jobs: int = MAX_JOBS,
    blob_grace: timedelta = BLOB_GRACE,
) -> PruneReport:
    """Delete (or with ``dry_run`` count) what finished more than ``older_than`` ago, then the
    blobs nothing names any more and nobody used within ``blob_grace``.

    The cutoff is taken once, from the database's clock.
    """
    started = time.perf_counter()
    cutoff = conn.execute(_CUTOFF, [older_than]).fetchone()[0]
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    pruner = _Pruner(conn, report, archive, batch_size, max_jobs)
    if dry_run:
        pruner.count(SELECT_WORKFLOWS, {})
    else:
        pruner.delete(LOCK_WORKFLOWS, {})
    after = 0
    while True:
        params = {"after": after, "cutoff": cutoff, "limit": batch_size}
        candidates = conn.execute(MODEL_RUNS, params).fetchall()
        if not candidates:
            break
        after = candidates[-1][0]
        expired = [model_run_id for model_run_id, ok in candidates if ok]
        if not expired:
            continue
        ids = array(expired)
        if dry_run:
            pruner.count(SELECT_BUNDLES, {"model_runs": ids})
            report.model_runs += len(expired)
            report.events += conn.execute(COUNT_MODEL_RUN_EVENTS, {"ids": ids}).fetchone()[0]
        else:
            pruner.delete(LOCK_BUNDLES, {"model_runs": ids})
            pruner.delete_model_runs(ids)
    if dry_run:
        report.blobs, report.blob_bytes = blobs.count_unreferenced(conn, grace=blob_grace)
    else:
        report.blobs, report.blob_bytes = blobs.delete_unreferenced(conn, grace=blob_grace)
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Pruner:
    """One prune's connection, report and limits, shared by its passes."""

    conn: psycopg.Connection
    report: PruneReport
    archive: EventArchive | None
    batch_size: int
    max_jobs: int

    def count(self, select: str, scope: dict) -> None:
        """--dry-run: one short statement per batch, like the real thing (no long snapshot)."""
        report, after = self.report, 0
        while True:
            params = {**scope, "after": after, "cutoff": report.cutoff, "limit": self.batch_size}
            ids = [r[0] for r in self.conn.execute(select, params)]
            if not ids:
                return
            counts = self.conn.execute(COUNT_WORKFLOW_ROWS, {"ids": array(ids)}).fetchone()
            report.workflows += len(ids)
            report.jobs += counts[0]
            report.edges += counts[1]
            report.events += counts[2]
            after = ids[-1]

    def delete(self, lock: str, scope: dict) -> None:
        """Delete the workflows ``lock`` finds, a batch per transaction."""
        conn, report, max_jobs, after = self.conn, self.report, self.max_jobs, 0
        while True:
            with conn.transaction():
                params = {
                    **scope,
                    "after": after,
                    "cutoff": report.cutoff,
                    "limit": self.batch_size,
                }
                locked = conn.execute(lock, params).fetchall()
                if not locked:
                    return
                # Whole workflows up to max_jobs jobs (at least one); the rest stay locked
                # only until this commit and come first in the next transaction.
                take, jobs = [], 0
                for workflow_id, job_count in locked:
                    if take and jobs + job_count > max_jobs:
                        break
                    take.append(workflow_id)
                    jobs += job_count
                whole = jobs <= max_jobs or self._delete_some_jobs(take[0])
                if whole:
                    ids = {"ids": array(take)}
                    events = self._delete_events(DELETE_WORKFLOW_EVENTS, ids)
                    conn.execute(DELETE_WORKFLOW_OUTPUTS, ids)
                    conn.execute(DELETE_WORKFLOW_FILES, ids)
                    report.edges += conn.execute(DELETE_WORKFLOW_EDGES, ids).rowcount
                    report.jobs += conn.execute(DELETE_WORKFLOW_JOBS, ids).rowcount
                    conn.execute(DELETE_WORKFLOW_CLAIMS, ids)
                    conn.execute(DELETE_WORKFLOW_COUNTS, ids)
                    report.workflows += conn.execute(DELETE_WORKFLOWS, ids).rowcount
                    self._archive(events)
            report.transactions += 1
            if whole:  # else the same big workflow again, in the next transaction
                after = take[-1]

    def _delete_some_jobs(self, workflow_id: int) -> bool:
        """Delete max_jobs jobs of a big workflow; True if the rest fits in this transaction."""
        limit = {"id": workflow_id, "limit": self.max_jobs + 1}
        job_ids = [r[0] for r in self.conn.execute(SOME_JOBS, limit)]
        if len(job_ids) <= self.max_jobs:
            return True
        params = {"id": workflow_id, "jobs": array(job_ids[: self.max_jobs])}
        events = self._delete_events(DELETE_JOB_EVENTS, params)
        self.conn.execute(DELETE_JOB_OUTPUTS, params)
        self.report.edges += self.conn.execute(DELETE_JOB_EDGES, params).fetchone()[0]
        self.report.jobs += self.conn.execute(DELETE_JOBS, params).rowcount
        self._archive(events)
        return False

    def delete_model_runs(self, ids: str) -> None:
        """Model runs whose bundles are all gone, with their own events: one transaction."""
        with self.conn.transaction():
            rows = self.conn.execute(LOCK_MODEL_RUNS, {"ids": ids}).fetchall()
            empty = [model_run_id for model_run_id, has_bundles in rows if not has_bundles]
            if not empty:
                return
            args = {"ids": array(empty)}
            events = self._delete_events(DELETE_MODEL_RUN_EVENTS, args)
            self.conn.execute(DELETE_MODEL_RUN_FILES, args)
            self.report.model_runs += self.conn.execute(DELETE_MODEL_RUNS, args).rowcount
            self._archive(events)
        self.report.transactions += 1

    def _delete_events(self, sql: str, params: dict) -> list[tuple] | int:
        """Deleted events as rows if archiving (to write before commit), else their number."""
        if self.archive is None:
            return self.conn.execute(sql, params).rowcount
        return self.conn.execute(f"{sql} RETURNING {_EVENT_COLUMNS}", params).fetchall()

    def _archive(self, events: list[tuple] | int) -> None:
        if isinstance(events, int):
            self.report.events += events
            return
        assert self.archive is not None
        self.archive.write(events)  # on disk before the caller's transaction commits
        self.report.events += len(events)
        self.report.archived += len(events)
