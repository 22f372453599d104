"""DAG specs: parse and validate completely before anything touches the database.

A spec is a mapping ``{"name": str, "jobs": [job, ...]}``; see docs/dags.md for every field.
Validation collects every problem it finds so that one run of ``smifdb submit`` reports them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from smifdb import errors, kinds
from smifdb.kinds import python as python_kind
from smifdb.limits import (
    MAX_KEY_LENGTH,
    LimitError,
    load_json,
    load_yaml,
)
from smifdb.pgtext import text_problem, text_problems

MAX_REPORTED = 20
PYTHON_TARGET = python_kind.TARGET  # module:attr, as deciders name theirs too
# The fields of every job; each kind (smifdb/kinds/) adds its own.
COMMON_JOB_FIELDS = frozenset(
    {
        "key",
        "after",
        "priority",
        "max_attempts",
        "timeout",
        "retry_backoff",
        "model",
        "operation",
        "timestep",
        "decision",
    }
)
TOP_FIELDS = {"name", "jobs"}


class SpecError(errors.BadInput, ValueError):
    """A DAG spec that cannot be submitted; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        text = "\n".join(f"  - {p}" for p in shown)
        if more:
            text += f"\n  … and {more} more"
        super().__init__(
            f"invalid DAG spec ({len(problems)} problem(s)):\n{text}", problems=problems
        )


@dataclass(frozen=True)
class Job:
    key: str
    kind: str  # a name in smifdb.kinds.KINDS
    payload: dict[str, Any]
    after: tuple[str, ...] = ()
    priority: int = 0
    max_attempts: int = 1
    timeout: float | None = None
    retry_backoff: float = 1.0
    model: str | None = None
    operation: str | None = None
    timestep: int | None = None
    decision: int | None = None


@dataclass(frozen=True)
class Dag:
    name: str
    jobs: list[Job]
    edges: list[tuple[str, str]] = field(default_factory=list)  # (parent key, child key)


def load_file(path: str | Path) -> Any:
    """Read a YAML or JSON file into plain data; SpecError if it is unreadable or unparsable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"cannot read {path}: {exc}"]) from exc
    return load_text(text, str(path), json_only=path.suffix.lower() == ".json")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"duplicate key {key!r} in one object")
        seen[key] = value
    return seen


def load_text(text: str, source: str, *, json_only: bool = False) -> Any:
    """Parse YAML (a superset of JSON) or strict JSON; a key repeated in a mapping is an error,
    and so is input past smifdb.limits (nesting, YAML alias expansion)."""
    try:
        if json_only:
            return load_json(text, object_pairs_hook=_unique_pairs)
        return load_yaml(text)
    except (json.JSONDecodeError, _DuplicateKey, yaml.YAMLError) as exc:
        raise SpecError([f"cannot parse {source}: {exc}"]) from exc
    except LimitError as exc:
        raise SpecError([f"refused {source}: {exc}"]) from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int32(value: Any) -> bool:
    """An integer a PostgreSQL integer column holds."""
    return _is_int(value) and -(2**31) <= value < 2**31


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_job(index: int, raw: Any, fields: frozenset[str], problems: list[str]) -> Job | None:
    where = f"jobs[{index}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return None
    key = raw.get("key")
    if not isinstance(key, str) or not key.strip():
        problems.append(f"{where}: 'key' must be a non-empty string")
        return None
    if len(key.encode(errors="replace")) > MAX_KEY_LENGTH:
        problems.append(f"{where}: 'key' must be at most {MAX_KEY_LENGTH} bytes in UTF-8")
        return None
    where = f"job {key!r}"
    start = len(problems)
    unknown = sorted(set(raw) - fields)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")

    parsed = kinds.parse(raw, where, problems)
    kind, payload = parsed if parsed is not None else ("", {})

    after = raw.get("after", [])
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        problems.append(f"{where}: 'after' must be a list of job keys")
        after = []
    priority = raw.get("priority", 0)
    if not _is_int32(priority):
        problems.append(f"{where}: 'priority' must be an integer")
    max_attempts = raw.get("max_attempts", 1)
    if not _is_int(max_attempts) or not 1 <= max_attempts <= 1000:
        problems.append(f"{where}: 'max_attempts' must be an integer from 1 to 1000")
    timeout = raw.get("timeout")
    if timeout is not None and (
        not _is_number(timeout) or not math.isfinite(timeout) or timeout <= 0
    ):
        problems.append(f"{where}: 'timeout' must be a positive number of seconds")
    retry_backoff = raw.get("retry_backoff", 1.0)
    if not _is_number(retry_backoff) or not 0 <= retry_backoff <= 86400:
        problems.append(f"{where}: 'retry_backoff' must be seconds from 0 to 86400")
    smif: dict[str, Any] = {}
    for name, check, wanted in (
        ("model", lambda v: isinstance(v, str), "a string"),
        ("operation", lambda v: isinstance(v, str), "a string"),
        ("timestep", _is_int32, "an integer"),
        ("decision", _is_int32, "an integer"),
    ):
        value = raw.get(name)
        if value is not None and not check(value):
            problems.append(f"{where}: {name!r} must be {wanted}")
        smif[name] = value
    if len(problems) > start:
        return None
    return Job(
        key=key,
        kind=kind,
        payload=payload,
        after=tuple(dict.fromkeys(after)),
        priority=priority,
        max_attempts=max_attempts,
        timeout=float(timeout) if timeout is not None else None,
        retry_backoff=float(retry_backoff),
        **smif,
    )


def parse(raw: Any, name: str | None = None) -> Dag:
    """Validate plain data (from YAML, JSON or Python) into a Dag, or raise SpecError."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise SpecError([f"the spec must be a mapping with 'jobs', got {type(raw).__name__}"])
    unknown = sorted(set(raw) - TOP_FIELDS)
    if unknown:
        problems.append(f"unknown top-level field(s) {', '.join(unknown)}")
    given = name is not None  # --name: not in the spec that text_problems checks below
    name = name if given else raw.get("name", "workflow")
    if not isinstance(name, str) or not name.strip():
        problems.append("'name' must be a non-empty string")
    elif given and (problem := text_problem(name)):
        problems.append(f"the name {problem}, which PostgreSQL cannot store")
    raw_jobs = raw.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.append("'jobs' must be a non-empty list")
        raise SpecError(problems)
    for where, problem in text_problems(raw):
        problems.append(f"{where}: the string {problem}, which PostgreSQL cannot store")

    jobs: list[Job] = []
    seen: set[str] = set()
    fields = COMMON_JOB_FIELDS | kinds.spec_fields()
    for index, raw_job in enumerate(raw_jobs):
        job = _check_job(index, raw_job, fields, problems)
        if job is None:
            continue
        if job.key in seen:
            problems.append(f"duplicate job key {job.key!r}")
            continue
        seen.add(job.key)
        jobs.append(job)

    graph = nx.DiGraph()
    graph.add_nodes_from(j.key for j in jobs)
    edges: list[tuple[str, str]] = []
    for job in jobs:
        for parent in job.after:
            if parent == job.key:
                problems.append(f"job {job.key!r} depends on itself")
            elif parent not in seen:
                problems.append(f"job {job.key!r} depends on unknown job {parent!r}")
            else:
                edges.append((parent, job.key))
    graph.add_edges_from(edges)
    if not problems and not nx.is_directed_acyclic_graph(graph):
        cycle = [u for u, _ in nx.find_cycle(graph)]
        problems.append("dependency cycle: " + " -> ".join(cycle + cycle[:1]))
    if problems:
        raise SpecError(problems)
    return Dag(name=name, jobs=jobs, edges=edges)


def with_base_dir(dag: Dag, base: Path) -> Dag:
    """The DAG of a spec file in folder ``base``: each kind says what that changes (command
    jobs run in ``base``, a relative ``cwd`` is taken from it)."""
    jobs = []
    for job in dag.jobs:
        payload = kinds.KINDS[job.kind].with_base_dir(job.payload, base)
        jobs.append(replace(job, payload=payload) if payload is not job.payload else job)
    return replace(dag, jobs=jobs)
