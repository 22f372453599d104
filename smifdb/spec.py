"""DAG specs: parse and validate completely before anything touches the database.

A spec is a mapping ``{"name": str, "jobs": [job, ...]}``; see docs/dags.md for every field.
Validation collects every problem it finds so that one run of ``smifdb submit`` reports them all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from smifdb import errors
from smifdb.limits import (
    MAX_ARG_BYTES,
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    LimitError,
    load_json,
    load_yaml,
    too_deep,
)
from smifdb.pgtext import text_problem, text_problems

MAX_REPORTED = 20
PYTHON_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
JOB_FIELDS = {
    "key",
    "command",
    "python",
    "args",
    "cwd",
    "env",
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
    kind: str  # "command" | "python"
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


def _exec_strings(payload: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """What a command job hands exec: each argument, and each NAME=value of its env."""
    if "shell" in payload:
        yield "'command'", payload["shell"]
    for arg in payload.get("argv", ()):
        yield "an argument of 'command'", arg
    for name, value in payload.get("env", {}).items():
        yield f"'env' {name}", f"{name}={value}"


def _check_job(index: int, raw: Any, problems: list[str]) -> Job | None:
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
    unknown = sorted(set(raw) - JOB_FIELDS)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")

    has_command, has_python = "command" in raw, "python" in raw
    kind, payload = "command", {}
    if has_command == has_python:
        problems.append(f"{where}: give exactly one of 'command' or 'python'")
    elif has_command:
        command = raw["command"]
        if isinstance(command, str) and command.strip():
            payload = {"shell": command}
        elif (
            isinstance(command, list)
            and command
            and all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in command)
        ):
            payload = {"argv": [str(a) for a in command]}
        else:
            problems.append(f"{where}: 'command' must be a non-empty string or list of strings")
        if "args" in raw:
            problems.append(f"{where}: 'args' goes with 'python', not 'command'")
    else:
        kind = "python"
        target = raw["python"]
        if not isinstance(target, str) or not PYTHON_TARGET.match(target):
            problems.append(f"{where}: 'python' must look like 'package.module:function'")
        args = raw.get("args", {})
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            problems.append(f"{where}: 'args' must be a mapping of names to values")
            args = {}
        elif too_deep(args, MAX_DEPTH - 3):  # under {"jobs": [{"args": ...}]}
            problems.append(f"{where}: 'args' nests more than {MAX_DEPTH - 3} levels deep")
        else:
            try:
                json.dumps(args, allow_nan=False)
            except (TypeError, ValueError):
                problems.append(f"{where}: 'args' must be JSON (no NaN or Infinity)")
        payload = {"function": target, "args": dict(args)}

    if "cwd" in raw:
        if isinstance(raw["cwd"], str) and raw["cwd"]:
            payload["cwd"] = raw["cwd"]
        else:
            problems.append(f"{where}: 'cwd' must be a non-empty string")
    if "env" in raw:
        env = raw["env"]
        if isinstance(env, Mapping) and all(
            isinstance(k, str) and k and "=" not in k and (isinstance(v, str) or _is_number(v))
            for k, v in env.items()
        ):
            payload["env"] = {k: str(v) for k, v in env.items()}
        else:
            problems.append(f"{where}: 'env' must map names (without '=') to strings or numbers")
    too_long = [
        name
        for name, arg in (_exec_strings(payload) if kind == "command" else ())
        if len(arg) > MAX_ARG_BYTES // 4 and len(arg.encode(errors="replace")) > MAX_ARG_BYTES
    ]
    if too_long:
        problems.append(
            f"{where}: {' and '.join(dict.fromkeys(too_long))} longer than {MAX_ARG_BYTES} "
            "bytes, more than Linux passes to a program in one argument or variable"
        )

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
    for index, raw_job in enumerate(raw_jobs):
        job = _check_job(index, raw_job, problems)
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
    """Command jobs get ``base`` as working folder; a relative ``cwd`` is taken from ``base``."""
    jobs = []
    for job in dag.jobs:
        if job.kind == "command":
            cwd = base / job.payload.get("cwd", ".")
            job = replace(job, payload={**job.payload, "cwd": str(cwd.resolve())})
        jobs.append(job)
    return replace(dag, jobs=jobs)
