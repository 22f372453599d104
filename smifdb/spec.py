"""DAG specs: parse and validate completely before anything touches the database.

A spec is a mapping ``{"name": str, "jobs": [job, ...]}``; see docs/dags.md for every field.
Validation collects every problem it finds so that one run of ``smifdb submit`` reports them all.
"""

from __future__ import annotations

import functools
import json
import math
import os
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import networkx as nx
import yaml

from smifdb import errors, kinds
from smifdb.kinds import command as command_kind
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
TOP_FIELDS = {"name", "jobs", "files"}
MAX_WORKFLOW_FILES = 100_000  # files one workflow's `files:` may hold


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


class Job(NamedTuple):
    """A checked job. A tuple: a million of them are built in a fraction of the time frozen
    dataclasses took (which set each field through object.__setattr__)."""

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
    files: tuple[str, ...] = ()  # the spec's `files:`, as given (see source_files)

    @property
    def edges(self) -> Iterator[tuple[str, str]]:
        """(parent key, child key) for every edge, made as read: a million-job DAG's two
        million edges are not held twice."""
        return ((parent, job.key) for job in self.jobs for parent in job.after)

    @property
    def edge_count(self) -> int:
        return sum(len(job.after) for job in self.jobs)


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


_SMIF_FIELDS = (
    ("model", str, "a string"),
    ("operation", str, "a string"),
    ("timestep", int, "an integer"),
    ("decision", int, "an integer"),
)
_SCALARS = (str, int, float, bool, type(None))


def _kind_memo_key(raw: Mapping[str, Any], owned: frozenset[str]) -> tuple | None:
    """A hashable copy of a job's kind fields when they hold only scalars and lists of
    scalars (each with its type, so 1, 1.0 and True differ); None otherwise. Jobs whose kind
    fields are equal get one payload: a million jobs calling one function parse it once and
    share one dict (payloads are never changed in place)."""
    items: list[tuple] = []
    for name, value in raw.items():
        if name not in owned:
            continue
        if type(value) in _SCALARS:
            items.append((name, type(value), value))
        elif type(value) is list and all(type(v) in _SCALARS for v in value):
            items.append((name, list, tuple([(type(v), v) for v in value])))
        else:
            return None
    return tuple(items)


@functools.cache
def _allowed_fields(owned: frozenset[str]) -> frozenset[str]:
    return COMMON_JOB_FIELDS | owned


def _check_job(
    index: int,
    raw: Any,
    owned: frozenset[str],
    problems: list[str],
    memo: dict[tuple, tuple[str, dict]],
) -> Job | None:
    """``owned``: the fields the kinds own (smifdb.kinds.spec_fields()); ``memo``: kind fields
    already parsed (_kind_memo_key) to their kind and payload."""
    allowed = _allowed_fields(owned)
    if type(raw) is not dict and not isinstance(raw, Mapping):
        problems.append(f"jobs[{index}]: must be a mapping, got {type(raw).__name__}")
        return None
    key = raw.get("key")
    if type(key) is not str or not key.strip():
        problems.append(f"jobs[{index}]: 'key' must be a non-empty string")
        return None
    if len(key) * 4 > MAX_KEY_LENGTH and len(key.encode(errors="replace")) > MAX_KEY_LENGTH:
        problems.append(f"jobs[{index}]: 'key' must be at most {MAX_KEY_LENGTH} bytes in UTF-8")
        return None
    where = f"job {key!r}"
    start = len(problems)
    if not raw.keys() <= allowed:
        unknown = sorted(set(raw).difference(COMMON_JOB_FIELDS, owned))
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")

    memo_key = _kind_memo_key(raw, owned)
    parsed = memo.get(memo_key) if memo_key is not None else None
    if parsed is None:
        parsed = kinds.parse(raw, where, problems, owned)
        if parsed is not None and memo_key is not None:
            memo[memo_key] = parsed
    kind, payload = parsed if parsed is not None else ("", {})

    after = raw.get("after", ())
    if isinstance(after, str):
        after = (after,)
    elif not isinstance(after, list) or not all(type(a) is str for a in after):
        if not isinstance(after, tuple) or after:
            problems.append(f"{where}: 'after' must be a list of job keys")
        after = ()
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
    for name, wanted_type, wanted in _SMIF_FIELDS:
        value = raw.get(name)
        if value is not None and not (
            _is_int32(value) if wanted_type is int else isinstance(value, str)
        ):
            problems.append(f"{where}: {name!r} must be {wanted}")
        smif[name] = value
    if len(problems) > start:
        return None
    return Job(
        key,
        kind,
        payload,
        tuple(dict.fromkeys(after)) if len(after) > 1 else tuple(after),
        priority,
        max_attempts,
        float(timeout) if timeout is not None else None,
        float(retry_backoff),
        smif["model"],
        smif["operation"],
        smif["timestep"],
        smif["decision"],
    )


def parse(raw: Any, name: str | None = None) -> Dag:
    """Validate plain data (from YAML, JSON or Python) into a Dag, or raise SpecError.

    Linear in jobs and edges, and light: the cycle check is Kahn's algorithm over counters
    (networkx is built only over what is left when there is a cycle, to name one)."""
    return Checking(raw, name).dag()


_TEXT_CHECKS = 10_000  # jobs whose strings are checked at once (one json.dumps of them)


def _text_problems(raw_jobs: list[Any], start: int, end: int, problems: list[str]) -> None:
    """Strings PostgreSQL cannot store in ``raw_jobs[start:end]``: one C-speed pass over them
    all, then, if it finds any, each job's walked to say where."""
    if next(text_problems(raw_jobs[start:end]), None) is None:
        return
    for position in range(start, min(end, len(raw_jobs))):
        for where, problem in text_problems(raw_jobs[position], f"jobs[{position}]"):
            problems.append(f"{where}: the string {problem}, which PostgreSQL cannot store")


def _key_index(raw_jobs: list[Any]) -> dict[str, int]:
    """Each key that is a string, to the position of the first job that has it (a job's key
    is checked with the job): by dict(zip(...)) from the end, at C speed, when it can be."""
    keys = [j.get("key") if isinstance(j, Mapping) else None for j in raw_jobs]
    try:
        index = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1), strict=True))
    except TypeError:  # a key that cannot be hashed: refused with its job
        index = {}
        for position, key in enumerate(keys):
            if type(key) is str:
                index.setdefault(key, position)
    if any(type(k) is not str for k in index):
        index = {k: v for k, v in index.items() if type(k) is str}
    return index


class Checking:
    """``parse`` as a stream, for a submission that writes each job as soon as it is checked
    (in a transaction it rolls back if ``finish`` refuses the spec): the top level and the
    jobs' keys first, then each job in order, checked whole (its fields, the jobs it names),
    then what needs every job (the problems found, and the cycle check)."""

    def __init__(self, raw: Any, name: str | None = None) -> None:
        self.problems: list[str] = []
        problems = self.problems
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
        top = {k: v for k, v in raw.items() if k != "jobs"}  # the jobs' strings: as they come
        for where, problem in text_problems(top):
            problems.append(f"{where}: the string {problem}, which PostgreSQL cannot store")
        self.name: str = name  # type: ignore[assignment]
        self.raw_jobs: list[Any] = raw_jobs
        self.files = _check_files(raw.get("files", []), problems)
        self.index = _key_index(raw_jobs)
        self.jobs: list[Job] = []
        self._dag: Dag | None = None
        # Every job's parents as positions, flat: job i's are flat[starts[i]:starts[i + 1]]. Two
        # arrays of machine integers, not a list per job: two million edges take 24 MB.
        self._parents = array("q", [0]), array("q")

    def __iter__(self) -> Iterator[Job]:
        """The jobs, each once it is checked, until a problem is found."""
        problems, index, files = self.problems, self.index, bool(self.files)
        starts, flat = self._parents
        owned = kinds.spec_fields()
        memo: dict[tuple, tuple[str, dict]] = {}
        raw_jobs = self.raw_jobs
        for position, raw_job in enumerate(raw_jobs):
            if position % _TEXT_CHECKS == 0:  # the next jobs' strings, in one pass
                _text_problems(raw_jobs, position, position + _TEXT_CHECKS, problems)
            job = _check_job(position, raw_job, owned, problems, memo)
            if job is None:
                continue
            if index[job.key] != position:
                problems.append(f"duplicate job key {job.key!r}")
                continue
            job = _with_inputs(job, index, files, problems)
            for parent in job.after:
                at = index.get(parent)
                if at is None:
                    problems.append(f"job {job.key!r} depends on unknown job {parent!r}")
                elif at == position:
                    problems.append(f"job {job.key!r} depends on itself")
                else:
                    flat.append(at)
            starts.append(len(flat))
            self.jobs.append(job)
            if not problems:  # a spec found wrong is only checked on, to list every problem
                yield job

    def dag(self) -> Dag:
        """Every job checked, then ``finish``."""
        for _ in self:
            pass
        return self.finish()

    def finish(self) -> Dag:
        """The Dag, once every job has been read; SpecError listing every problem, or naming a
        cycle."""
        if self._dag is None:
            if self.problems:
                raise SpecError(self.problems)
            _check_acyclic(self.jobs, self._parents)
            self._dag = Dag(name=self.name, jobs=self.jobs, files=self.files)
        return self._dag


def _check_acyclic(jobs: list[Job], parents: tuple[array, array]) -> None:
    """SpecError naming a cycle, if there is one. Kahn's algorithm run from the sinks up
    (each job lists its parents, not its children): a job is taken once all its children
    are, and jobs never taken are on a cycle or upstream of one."""
    starts, flat = parents
    children = array("q", bytes(8 * len(jobs)))
    for at in flat:
        children[at] += 1
    todo = [i for i, count in enumerate(children) if count == 0]
    taken = 0
    while todo:
        i = todo.pop()
        taken += 1
        for at in flat[starts[i] : starts[i + 1]]:
            children[at] -= 1
            if children[at] == 0:
                todo.append(at)
    if taken == len(jobs):
        return
    left = {job.key for job, count in zip(jobs, children, strict=True) if count > 0}
    graph = nx.DiGraph(
        (parent, job.key)
        for job in jobs
        if job.key in left
        for parent in job.after
        if parent in left
    )
    cycle = [u for u, _ in nx.find_cycle(graph)]
    raise SpecError(["dependency cycle: " + " -> ".join(cycle + cycle[:1])])


def _check_files(given: Any, problems: list[str]) -> tuple[str, ...]:
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(p, str) and p for p in given):
        problems.append("'files' must be a list of paths (files or folders)")
        return ()
    for path in given:
        if "\0" in path:
            problems.append(f"files: {path!r} contains a NUL character")
    return tuple(dict.fromkeys(given))


def _with_inputs(job: Job, keys: Mapping[str, int], files: bool, problems: list[str]) -> Job:
    """A job's inputs are jobs it waits for; a command job of a workflow with files gets them
    in its (private) folder, so its ``cwd`` must lie in that folder."""
    inputs = job.payload.get("inputs", ())
    for key in inputs:
        if key == job.key:
            problems.append(f"job {job.key!r} takes its own outputs as an input")
        elif key not in keys:
            problems.append(f"job {job.key!r} takes the outputs of unknown job {key!r}")
    payload = job.payload
    if files and job.kind == command_kind.KIND.name:
        payload = {**payload, "files": True}
        if "cwd" in payload and (why := command_kind.cwd_problem(payload["cwd"])):
            problems.append(f"job {job.key!r}: 'cwd' {why}")
    if payload is job.payload and not inputs:
        return job
    waits = (k for k in inputs if k in keys and k != job.key)
    after = tuple(dict.fromkeys((*job.after, *waits)))
    return job._replace(payload=payload, after=after)


def source_files(dag: Dag, base: Path) -> list[tuple[Path, str]]:
    """The files of a spec's ``files:`` as (folder, path under it: the file's path in every
    job's folder), each path once,
    or SpecError listing every problem (a path that is missing, or collides with another or
    with an input job's folder). ``base`` is the spec's folder: a given path inside it keeps
    its path relative to it, one outside (absolute) is its basename."""
    problems: list[str] = []
    base = Path(os.path.abspath(base))
    found: dict[str, tuple[Path, str]] = {}  # path in the jobs' folders: (root, as given)
    for given in dag.files:
        path = Path(os.path.abspath(base / given))
        if not path.exists():
            problems.append(f"files: {given} does not exist ({path})")
            continue
        root = base if path.is_relative_to(base) else path.parent
        real_root = root.resolve()
        top = path.relative_to(root).as_posix()
        if path.is_dir():
            walked = sorted(_walk(path))
        elif path.is_file():
            walked = [path]
        else:
            problems.append(f"files: {given} is neither a regular file nor a folder ({path})")
            continue
        for file in walked:
            rel = file.relative_to(root).as_posix()
            if not file.resolve().is_relative_to(real_root):
                problems.append(
                    f"files: {rel} (of {given}) leads out of {root} (to {file.resolve()})"
                )
            elif not file.resolve().is_file():
                problems.append(f"files: {rel} (of {given}) is not a regular file")
            elif rel in found and found[rel][1] != given:
                problems.append(
                    f"files: {given} and {found[rel][1]} would both be {rel} in the jobs' folders"
                )
            else:
                found.setdefault(rel, (root, given))
        if len(found) > MAX_WORKFLOW_FILES:
            raise SpecError([f"files: more than {MAX_WORKFLOW_FILES} files ({top})"])
    paths = set(found)
    for rel in found:  # a file where another path needs a folder
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                problems.append(
                    f"files: {'/'.join(parts[:i])} is a file, and {rel} needs it a folder"
                )
    tops = {rel.split("/", 1)[0] for rel in found}
    for job in dag.jobs:
        for key in job.payload.get("inputs", ()):
            if key in tops:
                problems.append(
                    f"job {job.key!r}: the outputs of input {key!r} would land in ./{key}/, "
                    f"which the workflow's files use"
                )
    if problems:
        raise SpecError(problems)
    return [(root, rel) for rel, (root, _) in sorted(found.items())]


def _walk(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (symbolic links to files included, to folders not)."""
    for dirpath, dirs, names in os.walk(folder):
        here = Path(dirpath)
        for name in dirs:
            if (here / name).is_symlink():
                yield here / name  # refused by the caller unless it is a file
        for name in names:
            yield here / name


def with_base_dir(dag: Dag, base: Path) -> Dag:
    """The DAG of a spec file in folder ``base``: each kind says what that changes (command
    jobs run in ``base``, a relative ``cwd`` is taken from it)."""
    jobs = []
    for job in dag.jobs:
        payload = kinds.KINDS[job.kind].with_base_dir(job.payload, base)
        jobs.append(job._replace(payload=payload) if payload is not job.payload else job)
    return replace(dag, jobs=jobs)
