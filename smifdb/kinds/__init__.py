"""Job kinds: what a job of each kind takes in its spec, and how a runner runs it.

A kind is one module here implementing :class:`Kind`; ``KINDS`` below is the registry that
spec validation, the runner's dispatch, the OpenAPI schema of a job and ``states.JOB_KINDS``
derive from. A job is of kind K when its spec has the field K (``command:``, ``python:``).
Adding a kind is a module, one line in ``KINDS``, and ``ALTER TYPE job_kind ADD VALUE`` in a
migration with the name appended to ``states.JOB_KINDS`` (the database's enum, which
tests/test_kinds.py checks against this registry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from smifdb import errors, states, workspace
from smifdb.execute import Attempt
from smifdb.kinds import command, python, smif
from smifdb.store.queue import Outcome


class Kind(Protocol):
    """One kind of job. Every method but ``parse`` and ``with_base_dir`` runs on a runner,
    outside any database transaction, in the attempt's slot thread (``stop``: in another)."""

    name: str  # the job_kind enum value, and the spec field that makes a job of this kind
    spec_fields: frozenset[str]  # the job fields this kind owns, ``name`` among them
    spec_schema: Mapping[str, Any]  # JSON Schema of each field a spec gives it (OpenAPI)

    def parse(self, raw: Mapping[str, Any], where: str, problems: list[str]) -> dict | None:
        """A spec job's kind fields as the job's payload; None after appending every problem."""
        ...

    def with_base_dir(self, payload: dict[str, Any], base: Path) -> dict[str, Any]:
        """The payload of a job read from a spec file in folder ``base``."""
        ...

    def prepare(self, attempt: Attempt) -> None:
        """Make what the attempt needs ready before it runs."""
        ...

    def run(self, attempt: Attempt) -> Outcome:
        """Run the attempt to its end (or until stopped) and say how it went."""
        ...

    def stop(self, attempt: Attempt, reason: str) -> bool:
        """Ask a running attempt to end (reason: 'timeout' | 'cancelled' | 'released'). True
        if ``run`` then returns soon; False if nothing can end it, so the runner records the
        attempt stopped at once and leaves it running."""
        ...

    def collect(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        """After ``run`` succeeded: what the attempt produced, into its outcome."""
        ...


KINDS: dict[str, Kind] = {k.name: k for k in (command.KIND, python.KIND, smif.KIND)}
if tuple(KINDS) != states.JOB_KINDS:  # a kind the database cannot store, or one it lacks
    raise RuntimeError(f"job kinds {tuple(KINDS)} differ from states.JOB_KINDS {states.JOB_KINDS}")


def spec_fields() -> frozenset[str]:
    """Every job field some kind owns."""
    return frozenset().union(*(k.spec_fields for k in KINDS.values()))


def choices() -> str:
    """The kinds' fields as a message names them: "'command' or 'python'"."""
    names = [repr(name) for name in KINDS]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parse(
    raw: Mapping[str, Any],
    where: str,
    problems: list[str],
    owned: frozenset[str] | None = None,
) -> tuple[str, dict] | None:
    """A spec job's kind and payload; None after appending every problem found. ``owned``:
    spec_fields(), from a caller that parses many jobs."""
    given = [kind for name, kind in KINDS.items() if name in raw]
    if len(given) != 1:
        problems.append(f"{where}: give exactly one of {choices()}")
        return None
    kind = given[0]
    start = len(problems)
    payload = kind.parse(raw, where, problems)
    for name in sorted((owned or spec_fields()).intersection(raw) - kind.spec_fields):
        owners = " or ".join(repr(k.name) for k in KINDS.values() if name in k.spec_fields)
        why = getattr(kind, "refuses", {}).get(name, "")
        problems.append(f"{where}: {name!r} goes with {owners}, not {kind.name!r}{why}")
    return None if payload is None or len(problems) > start else (kind.name, payload)


def run_attempt(attempt: Attempt) -> Outcome:
    """Prepare, run and (after success) collect one attempt; a bug or an environment problem
    fails the attempt instead of the runner."""
    try:
        kind = KINDS.get(attempt.job.kind)
        if kind is None:  # a newer smifdb's kind, claimed by this runner
            error = f"job kind {attempt.job.kind!r} is unknown to this runner"
            return attempt.outcome("failed", error=error, reason="unknown kind")
        try:
            kind.prepare(attempt)
            outcome = kind.run(attempt)
            if outcome.status == "succeeded":
                outcome = kind.collect(attempt, outcome)
            return outcome
        except errors.Error as exc:  # files that could not be fetched, found or stored
            if attempt.stop_reason is not None:
                return attempt.stopped_outcome()
            return attempt.outcome("failed", error=exc.message, reason=type(exc).__name__)
        finally:
            try:
                if attempt.folder is not None and not os.environ.get("SMIFDB_KEEP_JOB_FOLDERS"):
                    workspace.remove(attempt.folder)
            finally:
                attempt.held.close()  # e.g. a cached project's lock, once nothing links into it
    except Exception as exc:
        return attempt.outcome("failed", error=f"runner error: {exc!r}", reason="runner error")


def stop(attempt: Attempt, reason: str) -> bool:
    """Ask ``attempt`` to end; False if it cannot be ended and must be recorded at once."""
    kind = KINDS.get(attempt.job.kind)
    if kind is None:
        attempt.stop(reason)
        return True
    return kind.stop(attempt, reason)
