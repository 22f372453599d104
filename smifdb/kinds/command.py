"""``command`` jobs: a shell command or an argv list, run as a subprocess in its own process
group (smifdb.execute.run_process), in ``cwd``, with ``env`` on top of the runner's
environment less its secrets.

A job with files (the workflow's ``files:``, its own ``inputs:`` or ``outputs:``) runs in a
fresh private folder per attempt on whichever runner takes it, never in the spec's folder:
``prepare`` links the workflow's files and each input job's outputs (under ``./<key>/``) into
it from the runner's cache, and ``collect`` stores what its output globs match once it
succeeded. Its outputs are recorded with its success (smifdb.store.queue), so a stale attempt's
never replace those of the recorded one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from smifdb import errors, workspace
from smifdb.execute import Attempt, run_process
from smifdb.kinds import common
from smifdb.limits import MAX_ARG_BYTES
from smifdb.store.queue import Outcome

JOB_DIR_ENV = "SMIFDB_JOB_DIR"  # a private folder's absolute path, in the job's environment
PRIVATE_FIELDS = ("files", "inputs", "outputs")  # payload keys that give a job its own folder


class JobFilesError(errors.Error):
    """A job's files could not be placed in its folder or read from it (the disk, mostly)."""


def private(payload: Mapping[str, Any]) -> bool:
    """Does this job run in a private folder of its own (it has files)?"""
    return any(name in payload for name in PRIVATE_FIELDS)


def _parse_inputs(raw: Mapping[str, Any], where: str, problems: list[str]) -> list[str]:
    given = raw["inputs"]
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(k, str) and k for k in given):
        problems.append(f"{where}: 'inputs' must be a list of job keys")
        return []
    for key in given:
        if "/" in key or key in (".", "..") or "\0" in key:
            problems.append(
                f"{where}: input {key!r} cannot name a folder in the job's folder: an input "
                "job's key must be a plain folder name (no '/', not '.' or '..')"
            )
    return list(dict.fromkeys(given))


def _parse_outputs(raw: Mapping[str, Any], where: str, problems: list[str]) -> list[dict]:
    given = raw["outputs"]
    if isinstance(given, (str, Mapping)):
        given = [given]
    if not isinstance(given, list):
        problems.append(f"{where}: 'outputs' must be a list of globs or {{glob, optional}}")
        return []
    outputs = []
    for i, item in enumerate(given):
        at = f"{where}: outputs[{i}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(map(str, item)) - {"glob", "optional"})
            if unknown:
                problems.append(f"{at}: unknown field(s) {', '.join(unknown)}")
            optional = item.get("optional", False)
            if not isinstance(optional, bool):
                problems.append(f"{at}: 'optional' must be true or false")
            text = item.get("glob")
        else:
            text, optional = item, False
        if problem := workspace.pattern_problem(text):
            problems.append(f"{at}: the glob {problem}")
        else:
            outputs.append({"glob": text, "optional": optional is True})
    return outputs


def cwd_problem(cwd: str) -> str | None:
    """Why ``cwd`` cannot be a private folder's working folder: it must lie inside it."""
    if problem := workspace.pattern_problem(cwd):
        return problem.replace("job's folder", "job's private folder")
    return None


def _exec_strings(payload: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """What a command job hands exec: each argument, and each NAME=value of its env."""
    if "shell" in payload:
        yield "'command'", payload["shell"]
    for arg in payload.get("argv", ()):
        yield "an argument of 'command'", arg
    for name, value in payload.get("env", {}).items():
        yield f"'env' {name}", f"{name}={value}"


class Command:
    name = "command"
    spec_fields = frozenset({"command", "inputs", "outputs"}) | common.FIELDS
    spec_schema: ClassVar[dict[str, Any]] = {
        "command": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
            ]
        },
        "inputs": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Jobs whose outputs appear under ./<key>/ before this one runs "
            "(each is also waited for, as with 'after').",
        },
        "outputs": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "required": ["glob"],
                        "properties": {
                            "glob": {"type": "string"},
                            "optional": {"type": "boolean", "default": False},
                        },
                        "additionalProperties": False,
                    },
                ]
            },
            "description": "Globs relative to the job's folder, stored once it succeeded; "
            "one matching nothing fails the attempt unless optional.",
        },
        **common.SCHEMA,
    }

    def parse(self, raw: Mapping[str, Any], where: str, problems: list[str]) -> dict | None:
        start = len(problems)
        payload: dict[str, Any] = {}
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
        common.parse_cwd_env(raw, where, problems, payload)
        if "inputs" in raw:
            payload["inputs"] = _parse_inputs(raw, where, problems)
        if "outputs" in raw:
            payload["outputs"] = _parse_outputs(raw, where, problems)
        if private(payload) and "cwd" in payload and (why := cwd_problem(payload["cwd"])):
            problems.append(f"{where}: 'cwd' {why}")
        too_long = [
            name
            for name, arg in _exec_strings(payload)
            if len(arg) > MAX_ARG_BYTES // 4 and len(arg.encode(errors="replace")) > MAX_ARG_BYTES
        ]
        if too_long:
            problems.append(
                f"{where}: {' and '.join(dict.fromkeys(too_long))} longer than {MAX_ARG_BYTES} "
                "bytes, more than Linux passes to a program in one argument or variable"
            )
        return payload if len(problems) == start else None

    def with_base_dir(self, payload: dict[str, Any], base: Path) -> dict[str, Any]:
        """``base`` is the working folder; a relative ``cwd`` is taken from it. A job with
        files runs in its private folder instead, wherever ``base`` is."""
        if private(payload):
            return payload
        return {**payload, "cwd": str((base / payload.get("cwd", ".")).resolve())}

    def prepare(self, attempt: Attempt) -> None:
        """A private folder, holding the workflow's files and the input jobs' outputs."""
        payload, job = attempt.job.payload, attempt.job
        if not private(payload):
            return
        files = attempt.files
        if files is None:
            raise JobFilesError("this runner has no job files set up (no --cache-dir)")
        try:
            folder = workspace.fresh_folder(files.work_root, f"job-{job.id}.{job.attempt}")
            attempt.folder = folder  # removed after the attempt, whatever its end
            placed = files.job_inputs(
                job.workflow_id,
                files=bool(payload.get("files")),
                inputs=payload.get("inputs", ()),
            )
            # The cache evicts down to its cap after a fetch, before the links are made.
            objects = {(e.sha256, bool(e.mode & 0o111)): e.size for _, e in placed}
            total = sum(objects.values())
            if total > files.cache.max_bytes:
                raise JobFilesError(
                    f"the job's inputs are {total:,} bytes, more than this runner's "
                    f"--cache-max-bytes ({files.cache.max_bytes:,}): run it on a runner with "
                    "a larger cache"
                )
            files.materialise(placed, folder)
        except OSError as exc:
            raise JobFilesError(f"cannot make the job's folder on this runner: {exc}") from exc

    def run(self, attempt: Attempt) -> Outcome:
        payload = attempt.job.payload
        shell = "shell" in payload
        cwd, env = payload.get("cwd"), payload.get("env", {})
        if attempt.folder is not None:
            cwd = str(attempt.folder / (cwd or "."))
            env = {**env, JOB_DIR_ENV: str(attempt.folder)}
        return run_process(
            attempt,
            payload["shell"] if shell else payload["argv"],
            shell=shell,
            cwd=cwd,
            env=env,
        )

    def stop(self, attempt: Attempt, reason: str) -> bool:
        attempt.stop(reason)  # SIGTERM to its process group, SIGKILL after a grace
        return True

    def collect(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        """The files the output globs match, stored; an attempt whose outputs cannot all be
        stored fails, with none of them recorded."""
        patterns = [
            workspace.Pattern.from_payload(p) for p in attempt.job.payload.get("outputs", ())
        ]
        if attempt.folder is None or not patterns:
            return outcome
        try:
            found = workspace.collect(attempt.folder, patterns)
            outputs = attempt.files.store(found)
        except OSError as exc:
            raise JobFilesError(f"cannot read the job's outputs on this runner: {exc}") from exc
        return replace(outcome, outputs=outputs)


KIND = Command()
