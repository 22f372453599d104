"""How a runner reaches the queue: one set of operations, spoken in SQL or over HTTP.

The runner (smifdb.runner) is written against ``Channel``: a session with the queue that a
thread holds, opens again after a failure, and calls one operation at a time, each one short
transaction. ``direct.DirectChannel`` runs the operations on a PostgreSQL connection;
``http.HttpChannel`` sends each to an API process (smifdb.api.runners), which runs the same
``DirectChannel`` operation on its pool. So the semantics are the store's, whichever way the
runner talks, and the fencing of outcomes by owner, attempt and claim time holds for both.

This module holds what both sides share: the errors a runner survives, and the JSON forms of
claimed jobs, outcomes and reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol

from smifdb.db import DB_ERRORS
from smifdb.store.blobs import FileEntry
from smifdb.store.queue import ANYWHERE, ClaimedJob, FinishReport, Outcome, Scope

PROTOCOL = "v1"  # the path segment of the runner protocol: /api/runner/v1/...


class Unreachable(Exception):
    """The queue did not answer (an API process down, a network fault, a 5xx): retried."""


class Refused(Unreachable):
    """The API refused the runner's token (401/403): retried, since a token file may be
    renewed, but the runner claims nothing meanwhile and stops once refused for dead_after."""


class Unstorable(Exception):
    """PostgreSQL refused an outcome as data (too large, bad text): recorded apart."""


# Everything a runner outlives: outcomes wait in memory and the channel is opened again.
ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, Unreachable)


@dataclass
class Beat:
    """What a heartbeat learns: whether the name is still ours, and which jobs to cancel."""

    ours: bool
    cancel: list[int]


class Channel(Protocol):
    """A runner's session with the queue. Every method is one short transaction (or none)."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def register(
        self, name: str, *, host: str, pid: int, slots: int, dead_after: float, max_losses: int
    ) -> tuple[str, FinishReport]:
        """Start the runner under ``name`` (the API may qualify it) and take back what an
        earlier process of that name held. Returns the name to use, and what was taken."""

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
    ) -> Beat: ...

    def cycle(
        self,
        name: str,
        outcomes: list[Outcome],
        *,
        claim_n: int = 0,
        lease: float = 300.0,
        scope: Scope = ANYWHERE,
        close: Iterable[int] = (),
        recheck: Iterable[int] = (),
        defer_settle: bool = True,
    ) -> FinishReport:
        """Record ``outcomes`` and claim up to ``claim_n`` jobs (queue.finish)."""

    def reconnect(self, name: str, host: str, pid: int, known: list[int]) -> FinishReport | None:
        """After a lost session: None if another process holds the name now; else hand back
        jobs leased to us that we do not know of (a claim whose answer was lost)."""

    def rescue(
        self, name: str, *, dead_after: float, max_losses: int
    ) -> tuple[list[str], FinishReport]:
        """Mark silent runners lost and take back their jobs."""

    def set_state(self, name: str, host: str, pid: int, state: str) -> None: ...

    def finished(self, scope: Scope) -> str | None:
        """The final status of the scope's workflow or model run, None while it runs."""

    def anything_unfinished(self) -> bool: ...

    def next_retry(self) -> float | None:
        """Seconds until the next retry becomes ready (None: none waits)."""


# -- JSON forms ------------------------------------------------------------------------------


def _stamp(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_stamp(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an ISO 8601 time or null")
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        raise ValueError(f"{what} must carry its time zone")
    return stamp


_OUTCOME_TYPES: dict[str, tuple[type, ...]] = {
    "job_id": (int,),
    "workflow_id": (int,),
    "attempt": (int,),
    "owner": (str,),
    "status": (str,),
    "max_attempts": (int,),
    "retry_backoff": (int, float),
    "exit_code": (int, type(None)),
    "error": (str, type(None)),
    "log_tail": (str, type(None)),
    "reason": (str, type(None)),
    "key": (str, type(None)),
    "claim_id": (int, type(None)),
    "outputs": (list, type(None)),
}
_OUTCOME_FIELDS = {f.name for f in fields(Outcome)}
_REQUIRED = ("job_id", "workflow_id", "attempt", "owner", "status")
_OUTCOME_NAMES = tuple(f.name for f in fields(Outcome))
OUTCOME_STATUSES = ("succeeded", "failed", "cancelled", "released")


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    # Shallow: dataclasses.asdict deep-copies every outputs list, a third of an HTTP
    # runner's CPU per cycle; json.dumps only reads them.
    data = {name: getattr(outcome, name) for name in _OUTCOME_NAMES}
    data["claimed_at"] = _stamp(outcome.claimed_at)
    return data


def outcome_from(data: Any) -> Outcome:
    """An outcome from JSON, its types checked (ValueError names the first wrong field)."""
    if not isinstance(data, dict):
        raise ValueError("an outcome must be an object")
    if unknown := sorted(set(data) - _OUTCOME_FIELDS):
        raise ValueError(f"unknown outcome field(s): {', '.join(unknown)}")
    for name in _REQUIRED:
        if name not in data:
            raise ValueError(f"an outcome needs {name!r}")
    for name, types in _OUTCOME_TYPES.items():
        value = data.get(name)
        if name in data and (not isinstance(value, types) or isinstance(value, bool)):
            raise ValueError(f"outcome field {name!r} has the wrong type")
    if data["status"] not in OUTCOME_STATUSES:
        raise ValueError(f"outcome status must be one of {', '.join(OUTCOME_STATUSES)}")
    for entry in data.get("outputs") or ():
        entry_from(entry)
    return Outcome(**{**data, "claimed_at": _parse_stamp(data.get("claimed_at"), "claimed_at")})


def _plain(o: Outcome) -> bool:
    """A success with nothing to store but its fence and reason: sent grouped by claim."""
    return (
        o.status == "succeeded"
        and o.result is None
        and o.exit_code is None
        and o.error is None
        and o.log_tail is None
        and not o.outputs
    )


def outcomes_wire(
    outcomes: Iterable[Outcome],
) -> tuple[list[dict[str, Any]], list[Outcome], list[Outcome]]:
    """Plain successes as groups of one claim and reason (its id, time and reason once, the
    jobs, workflows and attempts as lists), those successes, and the rest (for
    ``outcome_json``). A batch of 64 no-op successes is then 0.8 kB to write and read, not
    18 kB of objects (a fifth of the time on each side)."""
    groups: dict[tuple[int | None, datetime | None, str | None], dict[str, Any]] = {}
    plain: list[Outcome] = []
    rest: list[Outcome] = []
    for o in outcomes:
        if not _plain(o):
            rest.append(o)
            continue
        plain.append(o)
        key = (o.claim_id, o.claimed_at, o.reason)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "claim_id": o.claim_id,
                "claimed_at": _stamp(o.claimed_at),
                "reason": o.reason,
                "jobs": [],
                "workflows": [],
                "attempts": [],
            }
        group["jobs"].append(o.job_id)
        group["workflows"].append(o.workflow_id)
        group["attempts"].append(o.attempt)
    return list(groups.values()), plain, rest


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    for v in value:
        if type(v) is not int or not 0 <= v <= BIGINT:
            raise ValueError(f"{what} must hold whole numbers from 0 to 2^63-1")
    return value


def successes_from(groups: Any, owner: str, limit: int) -> list[Outcome]:
    """Outcomes from ``outcomes_wire``'s groups, their types checked (ValueError)."""
    if not isinstance(groups, list):
        raise ValueError("'done' must be a list of groups")
    found: list[Outcome] = []
    for group in groups:
        if not isinstance(group, dict) or set(group) != _GROUP_FIELDS:
            raise ValueError(f"a group of 'done' has exactly {', '.join(sorted(_GROUP_FIELDS))}")
        claim_id = group["claim_id"]
        if claim_id is not None:
            _ids([claim_id], "a group's claim_id")
        claimed_at = _parse_stamp(group["claimed_at"], "a group's claimed_at")
        reason = group["reason"]
        if reason is not None and not isinstance(reason, str):
            raise ValueError("a group's reason must be text or null")
        jobs = _ids(group["jobs"], "a group's jobs")
        workflows = _ids(group["workflows"], "a group's workflows")
        attempts = _ids(group["attempts"], "a group's attempts")
        if not len(jobs) == len(workflows) == len(attempts):
            raise ValueError("a group's jobs, workflows and attempts must be lists of one length")
        if len(found) + len(jobs) > limit:
            raise ValueError(f"at most {limit} outcomes in one batch")
        found += [
            Outcome(
                job,
                wf,
                attempt,
                owner,
                "succeeded",
                reason=reason,
                claimed_at=claimed_at,
                claim_id=claim_id,
            )
            for job, wf, attempt in zip(jobs, workflows, attempts, strict=True)
        ]
    return found


_GROUP_FIELDS = {"claim_id", "claimed_at", "reason", "jobs", "workflows", "attempts"}
BIGINT = 2**63 - 1
CLAIMED_COLUMNS = list(ClaimedJob._fields)


def claimed_rows(jobs: list[ClaimedJob]) -> list[list[Any]]:
    """Claimed jobs as rows in CLAIMED_COLUMNS' order (a claim's time written once)."""
    stamps: dict[datetime | None, str | None] = {}
    rows = []
    for job in jobs:
        stamp = stamps.get(job.claimed_at, ...)
        if stamp is ...:
            stamp = stamps[job.claimed_at] = _stamp(job.claimed_at)
        row = list(job)
        row[_CLAIMED_AT] = stamp
        rows.append(row)
    return rows


def claimed_from_rows(columns: list[str], rows: list[list[Any]]) -> list[ClaimedJob]:
    """``claimed_rows`` read back by the columns' names (an API may add columns)."""
    at = [columns.index(name) for name in CLAIMED_COLUMNS]
    stamps: dict[str | None, datetime | None] = {}
    jobs = []
    for row in rows:
        values = [row[i] for i in at]
        text = values[_CLAIMED_AT]
        if (stamp := stamps.get(text, ...)) is ...:
            stamp = stamps[text] = _parse_stamp(text, "claimed_at")
        values[_CLAIMED_AT] = stamp
        jobs.append(ClaimedJob(*values))
    return jobs


_CLAIMED_AT = CLAIMED_COLUMNS.index("claimed_at")


def job_json(job: ClaimedJob) -> dict[str, Any]:
    data = job._asdict()
    data["claimed_at"] = _stamp(job.claimed_at)
    return data


def job_from(data: dict[str, Any]) -> ClaimedJob:
    return ClaimedJob(**{**data, "claimed_at": _parse_stamp(data.get("claimed_at"), "claimed_at")})


def report_json(report: FinishReport, *, rows: bool = False) -> dict[str, Any]:
    """``rows``: claimed jobs as ``claimed_rows`` under ``columns`` (the ``batch`` form)."""
    claimed: dict[str, Any] = (
        {"columns": CLAIMED_COLUMNS, "claimed_rows": claimed_rows(report.claimed)}
        if rows
        else {"claimed": [job_json(j) for j in report.claimed]}
    )
    return {
        "recorded": report.recorded,
        "became_ready": report.became_ready,
        **claimed,
        "finished_workflows": {str(k): v for k, v in report.finished_workflows.items()},
        "taken": [outcome_json(o) for o in report.taken],
        "unsettled": sorted(report.unsettled),
    }


def report_from(data: dict[str, Any]) -> FinishReport:
    return FinishReport(
        recorded=list(data["recorded"]),
        became_ready=data["became_ready"],
        claimed=(
            claimed_from_rows(data["columns"], data["claimed_rows"])
            if "claimed_rows" in data
            else [job_from(j) for j in data["claimed"]]
        ),
        finished_workflows={int(k): v for k, v in data["finished_workflows"].items()},
        taken=[outcome_from(o) for o in data["taken"]],
        unsettled=set(data["unsettled"]),
    )


def entry_json(entry: FileEntry) -> dict[str, Any]:
    return {"path": entry.path, "sha256": entry.sha256, "size": entry.size, "mode": entry.mode}


def entry_from(data: Any) -> FileEntry:
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        raise ValueError("a file entry must be an object with a path")
    sha, size, mode = data.get("sha256"), data.get("size"), data.get("mode", 0o644)
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError("a file entry's sha256 must be 64 hex characters")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (size, mode)):
        raise ValueError("a file entry's size and mode must be whole numbers")
    return FileEntry(data["path"], sha, size, mode)
