"""Model runs: rows that own a sequence of workflows, one per decision bundle.

The manager's whole state is here. A model run is *due* when it is unfinished and none of its
workflows is: the decision module must be asked for the next bundle. ``lock_due`` hands one due
model run to one manager (FOR NO KEY UPDATE SKIP LOCKED); the unique (model_run_id, bundle)
constraint makes a second copy of a bundle impossible even if two managers ever raced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from smifdb import errors
from smifdb.spec import Dag
from smifdb.store import FINISHED_JOBS, MODEL_RUN_CHANNEL, control, notify
from smifdb.store.auth import User, require_owner
from smifdb.store.blobs import FileEntry
from smifdb.store.submit import submit_dag


class ModelRunInUse(errors.Conflict):
    """The same model run of the same project is already running."""


class NotFound(errors.NotFound):
    """No such model run."""


@dataclass(frozen=True)
class ModelRun:
    id: int
    name: str
    kind: str
    project_dir: str
    decide: str | None
    options: dict[str, Any]
    status: str
    priority: int
    bundles: int
    error: str | None
    finished: bool
    submitted_by: int | None = None  # the API user's id; bundles' workflows carry it too


_COLUMNS = """
m.id, m.name, m.kind::text, m.project_dir, m.decide, m.options, m.status::text, m.priority,
m.bundles, m.error, m.finished_at IS NOT NULL, m.submitted_by
"""
_INSERT = """
INSERT INTO model_runs (name, kind, project_dir, decide, options, priority, submitted_by)
VALUES (%(name)s, %(kind)s, %(project_dir)s, %(decide)s, %(options)s, %(priority)s,
        %(submitted_by)s)
RETURNING id
"""
_EVENT = """
INSERT INTO events (model_run_id, workflow_id, from_status, to_status, actor, reason)
VALUES (%s, %s, %s, %s, %s, %s)
"""
_LOCK_DUE = f"""
SELECT {_COLUMNS} FROM model_runs m
WHERE m.finished_at IS NULL
  AND (%(only)s::bigint IS NULL OR m.id = %(only)s)
  AND NOT (m.id = ANY(%(skip)s::bigint[]))
  AND NOT EXISTS (
      SELECT 1 FROM workflows w WHERE w.model_run_id = m.id AND w.finished_at IS NULL)
ORDER BY m.priority DESC, m.id
LIMIT 1
FOR NO KEY UPDATE OF m SKIP LOCKED
"""
_LAST_FRAGMENT = """
SELECT bundle, id, status::text FROM workflows WHERE model_run_id = %s
ORDER BY bundle DESC LIMIT 1
"""
_SET_OPTIONS = "UPDATE model_runs SET options = %s WHERE id = %s"
_BUNDLE_SUBMITTED = "UPDATE model_runs SET bundles = %s WHERE id = %s"
_FINISH = """
UPDATE model_runs SET status = %(status)s, error = %(error)s, finished_at = now()
WHERE id = %(id)s AND finished_at IS NULL
RETURNING status::text
"""
_HISTORY = """
SELECT w.bundle, w.id, j.key, j.status::text, j.result, j.model, j.timestep, j.decision
FROM workflows w JOIN jobs j ON j.workflow_id = w.id
WHERE w.model_run_id = %s AND w.bundle = ANY(%s::int[])
ORDER BY w.bundle, j.id
"""
_BUNDLE_COUNT = "SELECT count(*) FROM workflows WHERE model_run_id = %s"
_DECIDER_STATE = "SELECT decider_state FROM workflows WHERE model_run_id = %s AND bundle = %s"
_SET_DECIDER_STATE = "UPDATE workflows SET decider_state = %s WHERE id = %s"
_BY_ID = f"SELECT {_COLUMNS} FROM model_runs m WHERE m.id = %s"
_BY_NAME = f"SELECT {_COLUMNS} FROM model_runs m WHERE m.name = %s ORDER BY m.id DESC LIMIT 1"
_LOCK = f"SELECT {_COLUMNS} FROM model_runs m WHERE m.id = %s FOR NO KEY UPDATE"
_UNFINISHED_FRAGMENTS = """
SELECT id FROM workflows WHERE model_run_id = %s AND finished_at IS NULL ORDER BY id
"""
# A model run with its bundles' job counts: listings add WHERE, GROUP BY m.id and an order.
_SUMMARY = f"""
SELECT m.id, m.name, m.kind::text AS kind, m.project_dir, m.status::text AS status, m.bundles,
       m.error, m.submitted_at, m.finished_at,
       extract(epoch FROM coalesce(m.finished_at, now()) - m.submitted_at)::float AS elapsed,
       coalesce(sum(w.job_count), 0)::int AS jobs,
       coalesce(sum({FINISHED_JOBS}), 0)::int AS jobs_finished,
       (array_agg(w.id ORDER BY w.bundle DESC))[1] AS current_workflow
FROM model_runs m LEFT JOIN workflows w ON w.model_run_id = m.id
"""
_LIST = f"""
{_SUMMARY}WHERE (%(id)s::bigint IS NULL OR m.id = %(id)s)
  AND (%(name)s::text IS NULL OR m.name = %(name)s)
  AND (%(project)s::text IS NULL OR m.project_dir = %(project)s)
GROUP BY m.id
ORDER BY m.id DESC
LIMIT %(limit)s
"""
# The newest run of each name (of one project, if given), newest first from before the model run
# `before`; statuses filter after that choice. The anti-join reads model_runs whole: a table of
# one row per model run started, far smaller than its workflows.
_NEWEST = f"""
{_SUMMARY}WHERE (%(project)s::text IS NULL OR m.project_dir = %(project)s)
  AND (%(statuses)s::text[] IS NULL OR m.status::text = ANY(%(statuses)s))
  AND m.id < coalesce(%(before)s::bigint, 9223372036854775807)
  AND NOT EXISTS (
      SELECT 1 FROM model_runs n
      WHERE n.name = m.name AND n.id > m.id
        AND (%(project)s::text IS NULL OR n.project_dir = %(project)s))
GROUP BY m.id
ORDER BY m.id DESC
LIMIT %(limit)s
"""
# The newest run of each of these names of one project (the smif app's configured runs).
_NEWEST_OF = f"""
{_SUMMARY}WHERE m.project_dir = %(project)s AND m.name = ANY(%(names)s)
  AND NOT EXISTS (
      SELECT 1 FROM model_runs n
      WHERE n.name = m.name AND n.id > m.id AND n.project_dir = %(project)s)
GROUP BY m.id
"""
# The last jobs of a model run to have ended or started, with their logs' tails, oldest first.
_JOB_LOGS = """
SELECT * FROM (
    SELECT w.bundle, j.key, j.status::text AS status, j.exit_code, j.error, j.log_tail,
           j.started_at, j.finished_at
    FROM workflows w JOIN jobs j ON j.workflow_id = w.id
    WHERE w.model_run_id = %(id)s AND j.started_at IS NOT NULL
    ORDER BY coalesce(j.finished_at, j.started_at) DESC, j.id DESC
    LIMIT %(limit)s
) last ORDER BY coalesce(finished_at, started_at), bundle, key
"""
_BUNDLES = f"""
SELECT w.bundle, w.id AS workflow_id, w.name, w.status::text AS status, w.job_count,
       w.job_count - {FINISHED_JOBS} AS unfinished_jobs, w.submitted_at, w.finished_at
FROM workflows w WHERE w.model_run_id = %s ORDER BY w.bundle
"""
_WORK = """
SELECT coalesce(sum(extract(epoch FROM j.finished_at - j.started_at)), 0)::float,
       extract(epoch FROM max(j.finished_at) - min(j.started_at))::float
FROM workflows w JOIN jobs j ON j.workflow_id = w.id
WHERE w.model_run_id = %s AND j.started_at IS NOT NULL AND j.finished_at IS NOT NULL
"""
# What a model run's results folder holds now: the results/ files recorded with the model run
# (warm-start results, decision states) and the outputs of its succeeded jobs, one per path (a
# job's output over a recorded file of the same path; a later job over an earlier one).
_RESULT_FILES = """
SELECT DISTINCT ON (path) path, encode(sha256, 'hex'), size, mode FROM (
    SELECT f.path, f.sha256, f.size, f.mode, 0 AS source, 0::bigint AS job_id
    FROM model_run_files f
    WHERE f.model_run_id = %(id)s AND starts_with(f.path, 'results/')
    UNION ALL
    SELECT o.path, o.sha256, o.size, o.mode, 1, j.id
    FROM workflows w JOIN jobs j ON j.workflow_id = w.id JOIN job_outputs o ON o.job_id = j.id
    WHERE w.model_run_id = %(id)s AND j.status = 'succeeded'
) r
WHERE NOT %(jobs_only)s OR r.source = 1
ORDER BY path, source DESC, job_id DESC
"""
# The newest earlier model run of this name and project, whose results a warm start reuses.
_PREVIOUS = """
SELECT id FROM model_runs WHERE name = %s AND project_dir = %s AND id < %s
ORDER BY id DESC LIMIT 1
"""
_EVENTS = """
SELECT at, workflow_id, from_status, to_status, actor, reason FROM events
WHERE model_run_id = %s ORDER BY id
"""


def _model_run(row: tuple | None) -> ModelRun | None:
    return None if row is None else ModelRun(*row)


def create(
    conn: psycopg.Connection,
    *,
    name: str,
    kind: str,
    project_dir: str,
    decide: str | None,
    options: dict[str, Any],
    priority: int,
    actor: str,
    submitted_by: int | None = None,
) -> int:
    """Within the caller's transaction: record a new running model run."""
    try:
        with conn.transaction():
            model_run_id = conn.execute(
                _INSERT,
                {
                    "name": name,
                    "kind": kind,
                    "project_dir": project_dir,
                    "decide": decide,
                    "options": Jsonb(options),
                    "priority": priority,
                    "submitted_by": submitted_by,
                },
            ).fetchone()[0]
    except psycopg.errors.UniqueViolation as exc:
        raise ModelRunInUse(
            f"model run {name!r} of {project_dir} is already running; "
            f"cancel it first (smifdb modelrun cancel {name})"
        ) from exc
    conn.execute(_EVENT, (model_run_id, None, None, "running", actor, "submitted"))
    return model_run_id


def refused(
    conn: psycopg.Connection,
    *,
    name: str,
    project_dir: str,
    options: dict[str, Any],
    actor: str,
    error: str,
    submitted_by: int | None = None,
) -> int:
    """Record a smif model run that could not start as failed, saying why (as ``smif app``
    reports a run whose ``smif run`` failed at once): one transaction."""
    with conn.transaction():
        model_run_id = create(
            conn,
            name=name,
            kind="smif",
            project_dir=project_dir,
            decide=None,
            options=options,
            priority=0,
            actor=actor,
            submitted_by=submitted_by,
        )
        finish(conn, model_run_id, "failed", actor=actor, reason="could not start", error=error)
    return model_run_id


def submit_bundle(
    conn: psycopg.Connection,
    model_run: ModelRun,
    bundle: int,
    dag: Dag,
    *,
    actor: str,
    decider_state: Any = None,
) -> int:
    """Within the caller's transaction: write bundle ``bundle`` of a model run as a workflow,
    with ``decider_state`` (JSON: what the decider resumes from for the next bundle)."""
    if model_run.priority:
        dag = replace(dag, jobs=[replace(j, priority=model_run.priority) for j in dag.jobs])
    workflow_id = submit_dag(
        conn,
        dag,
        actor=actor,
        model_run=model_run.name,
        bundle=bundle,
        model_run_id=model_run.id,
        submitted_by=model_run.submitted_by,
    )
    if decider_state is not None:
        conn.execute(_SET_DECIDER_STATE, (Jsonb(decider_state), workflow_id))
    conn.execute(_BUNDLE_SUBMITTED, (bundle + 1, model_run.id))
    conn.execute(
        _EVENT,
        (model_run.id, workflow_id, None, "running", actor, f"bundle {bundle} submitted"),
    )
    return workflow_id


def lock_due(
    conn: psycopg.Connection, *, only: int | None = None, skip: list[int] | None = None
) -> ModelRun | None:
    """Within the caller's transaction: lock one model run whose next step is due, if any."""
    params = {"only": only, "skip": skip or []}
    return _model_run(conn.execute(_LOCK_DUE, params).fetchone())


def set_options(conn: psycopg.Connection, model_run_id: int, options: dict[str, Any]) -> None:
    conn.execute(_SET_OPTIONS, (Jsonb(options), model_run_id))


def last_fragment(conn: psycopg.Connection, model_run_id: int) -> tuple[int, int, str] | None:
    """(bundle, workflow id, workflow status) of the newest fragment, or None."""
    return conn.execute(_LAST_FRAGMENT, [model_run_id]).fetchone()


def finish(
    conn: psycopg.Connection,
    model_run_id: int,
    status: str,
    *,
    actor: str,
    reason: str,
    error: str | None = None,
) -> bool:
    """Within the caller's transaction: end a model run (False if it had already ended)."""
    row = conn.execute(_FINISH, {"id": model_run_id, "status": status, "error": error}).fetchone()
    if row is None:
        return False
    conn.execute(_EVENT, (model_run_id, None, "running", status, actor, reason))
    notify(conn, MODEL_RUN_CHANNEL, model_run_id)
    return True


class History(Sequence):
    """A model run's finished bundles, oldest first, each
    ``{"bundle", "workflow_id", "jobs": {key: {status, result, model, timestep, decision}},
    "results": {key: result}}``, read from the tables only when asked for: a decider that
    looks at the last bundle reads that bundle alone, so deciding bundle k does not cost more
    as k grows (one that iterates reads them all, once). Use within the caller's transaction.
    """

    def __init__(self, conn: psycopg.Connection, model_run_id: int, bundles: int) -> None:
        self.conn, self.model_run_id, self.bundles = conn, model_run_id, bundles
        self._read: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.bundles

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._entries(range(self.bundles)[index])
        if not -self.bundles <= index < self.bundles:
            raise IndexError("bundle out of range")
        return self._entries([index % self.bundles])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._entries(range(self.bundles)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"History(model run {self.model_run_id}, {self.bundles} bundle(s))"

    def decider_state(self, bundle: int) -> Any:
        """What the decider stored when it decided ``bundle`` (submit_bundle), or None."""
        row = self.conn.execute(_DECIDER_STATE, [self.model_run_id, bundle]).fetchone()
        return None if row is None else row[0]

    def _entries(self, wanted: Iterable[int]) -> list[dict[str, Any]]:
        wanted = list(wanted)
        missing = [b for b in wanted if b not in self._read]
        if missing:
            rows = self.conn.execute(_HISTORY, [self.model_run_id, missing])
            for bundle, workflow_id, key, status, result, model, timestep, decision in rows:
                entry = self._read.setdefault(
                    bundle,
                    {"bundle": bundle, "workflow_id": workflow_id, "jobs": {}, "results": {}},
                )
                entry["jobs"][key] = {
                    "status": status,
                    "result": result,
                    "model": model,
                    "timestep": timestep,
                    "decision": decision,
                }
                entry["results"][key] = result
        return [self._read[b] for b in wanted]


def history(conn: psycopg.Connection, model_run_id: int) -> list[dict[str, Any]]:
    """Finished bundles with their jobs' statuses and results, oldest first, all read now."""
    bundles = conn.execute(_BUNDLE_COUNT, [model_run_id]).fetchone()[0]
    return list(History(conn, model_run_id, bundles))


def get(conn: psycopg.Connection, ref: str | int) -> ModelRun:
    """A model run by id, or the newest one of that name."""
    text = str(ref)
    row = None
    if text.isdigit():
        row = conn.execute(_BY_ID, [int(text)]).fetchone()
    if row is None:
        row = conn.execute(_BY_NAME, [text]).fetchone()
    if row is None:
        raise NotFound(f"no model run {text!r}")
    return ModelRun(*row)


def listing(
    conn: psycopg.Connection,
    model_run_id: int | None = None,
    *,
    name: str | None = None,
    project_dir: str | None = None,
    limit: int = 50,
) -> list[dict]:
    """Model runs with progress, newest first."""
    params = {"id": model_run_id, "name": name, "project": project_dir, "limit": limit}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_LIST, params).fetchall()


def newest(
    conn: psycopg.Connection,
    *,
    project_dir: str | None,
    statuses: list[str] | None,
    limit: int,
    before: int | None = None,
) -> list[dict]:
    """The newest run of each name with progress, newest first: one page of the smif app's list."""
    params = {"project": project_dir, "statuses": statuses, "limit": limit, "before": before}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_NEWEST, params).fetchall()


def newest_of(conn: psycopg.Connection, *, project_dir: str, names: list[str]) -> list[dict]:
    """The newest run of each of ``names`` in the project, with progress (any order)."""
    params = {"project": project_dir, "names": names}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_NEWEST_OF, params).fetchall()


def job_logs(conn: psycopg.Connection, model_run_id: int, limit: int) -> list[dict]:
    """The ``limit`` jobs of a model run that started last, with their log tails, oldest
    first: the console a model run's status shows."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_JOB_LOGS, {"id": model_run_id, "limit": limit}).fetchall()


def events(conn: psycopg.Connection, model_run_id: int) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_EVENTS, [model_run_id]).fetchall()


def cancel(
    conn: psycopg.Connection, ref: str | int, *, actor: str, by: User | None = None
) -> tuple[ModelRun, int]:
    """Cancel a model run and its unfinished fragments in one transaction (``by``: the API
    user asking, who must have submitted it unless an admin).

    Locks the model run first, so a manager deciding its next bundle finishes (and its new
    fragment is cancelled here) or has not started (and will find the run ended).
    Returns the model run as it was and the number of fragments cancelled.
    """
    model_run = get(conn, ref)
    with conn.transaction():
        row = conn.execute(_LOCK, [model_run.id]).fetchone()
        if row is None:  # pruned since get(): it had ended long ago
            raise NotFound(f"no model run {ref!r}")
        model_run = ModelRun(*row)
        require_owner(by, model_run.submitted_by, f"model run {model_run.name!r}")
        if model_run.finished:
            return model_run, 0
        fragments = [r[0] for r in conn.execute(_UNFINISHED_FRAGMENTS, [model_run.id])]
        for workflow_id in fragments:
            control.cancel(conn, workflow_id, actor=actor, reason="model run cancelled")
        finish(conn, model_run.id, "cancelled", actor=actor, reason="cancelled by user")
    return model_run, len(fragments)


def bundles(conn: psycopg.Connection, model_run_id: int) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_BUNDLES, [model_run_id]).fetchall()


def result_files(
    conn: psycopg.Connection, model_run_id: int, *, jobs_only: bool = False
) -> list[FileEntry]:
    """The files of a model run's results/ folder as they stand: its recorded results/ files
    and its succeeded jobs' outputs (``jobs_only``: those alone), one entry per path."""
    rows = conn.execute(_RESULT_FILES, {"id": model_run_id, "jobs_only": jobs_only})
    return [FileEntry(path, sha, size, mode) for path, sha, size, mode in rows]


def previous(conn: psycopg.Connection, model_run: ModelRun) -> int | None:
    """The id of the newest earlier model run of the same name and project, if any."""
    row = conn.execute(_PREVIOUS, (model_run.name, model_run.project_dir, model_run.id)).fetchone()
    return None if row is None else row[0]


def work_and_makespan(conn: psycopg.Connection, model_run_id: int) -> tuple[float, float | None]:
    """Seconds of job time, and first job start to last job end, over all bundles."""
    work, makespan = conn.execute(_WORK, [model_run_id]).fetchone()
    return work, makespan
