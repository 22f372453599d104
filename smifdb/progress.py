"""Progress bars and end-of-run summaries for `smifdb run`, `wait` and `modelrun run`."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import psycopg

from smifdb import db
from smifdb.db import DB_ERRORS
from smifdb.store import modelruns, read
from smifdb.store.read import Progress

ORDER = ("succeeded", "running", "ready", "waiting", "failed", "upstream_failed", "cancelled")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def console(run: dict, events: list[dict], jobs: list[dict]) -> str:
    """A model run's console, as the smif app shows a run's output: its status changes, then
    its last jobs with their logs' tails, newest last."""
    lines = [f"model run {run['name']} (smifdb model run {run['id']}): {run['status']}"]
    for e in events:
        where = f" bundle workflow {e['workflow_id']}" if e["workflow_id"] else ""
        change = f"{e['from_status'] or 'new'} -> {e['to_status']}"
        reason = f": {e['reason']}" if e["reason"] else ""
        lines.append(f"{e['at']:%Y-%m-%d %H:%M:%S}{where} {change}{reason} ({e['actor']})")
    for j in jobs:
        ended = f" exit {j['exit_code']}" if j["exit_code"] is not None else ""
        lines.append(f"[bundle {j['bundle']}] {j['key']}: {j['status']}{ended}")
        if j["error"]:
            lines.append(f"    {j['error']}")
        lines += [f"    {line}" for line in (j["log_tail"] or "").splitlines()]
    if run["error"]:
        lines.append(f"error: {run['error']}")
    return "\n".join(lines) + "\n"


def render(p: Progress, width: int = 28) -> str:
    fraction = p.done / p.job_count if p.job_count else 1.0
    filled = int(fraction * width)
    bar = "#" * filled + "-" * (width - filled)
    counts = ", ".join(f"{p.counts[s]} {s}" for s in ORDER if p.counts.get(s))
    return (
        f"workflow {p.workflow_id} [{bar}] {p.done}/{p.job_count} ({fraction:.0%})"
        f"  {counts}  {_duration(p.elapsed)}"
    )


class ProgressPrinter:
    """Redraws one line on a terminal; elsewhere prints a line when something changed."""

    def __init__(
        self,
        conn: psycopg.Connection,
        workflow_id: int,
        stream: TextIO = sys.stderr,
        interval: float = 0.25,
        dsn: str | None = None,
    ) -> None:
        self.conn, self.workflow_id, self.stream = conn, workflow_id, stream
        self.dsn = dsn  # given: a lost connection is opened again, and ticks skip meanwhile
        self.tty = stream.isatty()
        self.interval = interval if self.tty else max(interval, 5.0)
        self.last_time = 0.0
        self.last_line = ""
        self.latest: Progress | None = None

    def tick(self, force: bool = False) -> Progress | None:
        """Read progress if the interval has passed (or ``force``); show it if it changed."""
        now = time.monotonic()
        if not force and now - self.last_time < self.interval:
            return self.latest
        self.last_time = now
        try:
            self.latest = read.progress(self.connection(), self.workflow_id)
        except DB_ERRORS:
            if self.dsn is None:
                raise
            return self.latest  # the database is away: the runner carries on without us
        if self.latest is None:
            return None
        line = render(self.latest)
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)))
            self.stream.flush()
        elif line.split("  ")[:2] != self.last_line.split("  ")[:2]:
            self.stream.write(line + "\n")
        self.last_line = line
        return self.latest

    def connection(self) -> psycopg.Connection:
        """The printer's connection, opened again if it was lost (and a dsn was given)."""
        if self.dsn is not None and (self.conn.closed or self.conn.broken):
            self.conn = db.connect(self.dsn, connect_timeout=5)
        return self.conn

    def close(self) -> None:
        if self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()


def _parallelism(work: float, makespan: float | None) -> list[str]:
    if not makespan:
        return []
    return [f"  {work:.1f} s of job time in {makespan:.1f} s ({work / makespan:.1f}x parallel)"]


def summary(conn: psycopg.Connection, workflow_id: int) -> str:
    p = read.progress(conn, workflow_id)
    if p is None:
        return f"workflow {workflow_id} not found"
    lines = [
        f"workflow {p.workflow_id} {p.name!r}: {p.status.upper()} in {_duration(p.elapsed)}",
        "  " + ", ".join(f"{p.counts[s]} {s}" for s in ORDER if p.counts.get(s)),
    ]
    lines.extend(_parallelism(*read.work_and_makespan(conn, workflow_id)))
    for job in read.problem_jobs(conn, workflow_id):
        lines.append(
            f"  {job['status']}: {job['key']} (attempt {job['attempts']}): {job['error'] or ''}"
        )
        tail = (job["log_tail"] or "").strip().splitlines()[-3:]
        lines.extend(f"      | {t}" for t in tail)
    return "\n".join(lines)


class ModelRunProgress:
    """Follows a model run's newest fragment with a ProgressPrinter, a line per bundle."""

    def __init__(self, conn: psycopg.Connection, model_run_id: int, stream: TextIO = sys.stderr):
        self.conn, self.model_run_id, self.stream = conn, model_run_id, stream
        self.printer: ProgressPrinter | None = None

    def tick(self, force: bool = False) -> None:
        rows = modelruns.listing(self.conn, self.model_run_id)
        current = rows[0]["current_workflow"] if rows else None
        if current is None:
            return
        if self.printer is None or self.printer.workflow_id != current:
            if self.printer is not None:
                self.printer.tick(force=True)
                self.printer.close()
            self.printer = ProgressPrinter(self.conn, current, self.stream)
            force = True
        self.printer.tick(force=force)

    def close(self) -> None:
        if self.printer is not None:
            self.printer.tick(force=True)
            self.printer.close()


def model_run_summary(conn: psycopg.Connection, model_run_id: int) -> str:
    rows = modelruns.listing(conn, model_run_id)
    if not rows:
        return f"model run {model_run_id} not found"
    m = rows[0]
    lines = [
        f"model run {m['id']} {m['name']!r}: {m['status'].upper()} in {_duration(m['elapsed'])}"
        f", {m['bundles']} bundle(s), {m['jobs']} job(s)"
    ]
    if m["error"]:
        lines.append(f"  {m['error']}")
    lines.extend(_parallelism(*modelruns.work_and_makespan(conn, model_run_id)))
    for b in modelruns.bundles(conn, model_run_id):
        lines.append(
            f"  bundle {b['bundle']}: workflow {b['workflow_id']} {b['status']}, "
            f"{b['job_count']} job(s)  {b['name']}"
        )
        if b["status"] in ("failed", "cancelled"):
            lines.extend("  " + line for line in summary(conn, b["workflow_id"]).splitlines()[1:])
    return "\n".join(lines)
