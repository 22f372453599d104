"""``command`` jobs: a shell command or an argv list, run as a subprocess in its own process
group (smifdb.execute.run_process), in ``cwd``, with ``env`` on top of the runner's
environment less its secrets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from smifdb.execute import Attempt, run_process
from smifdb.kinds import common
from smifdb.limits import MAX_ARG_BYTES
from smifdb.store.queue import Outcome


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
    spec_fields = frozenset({"command"}) | common.FIELDS
    spec_schema: ClassVar[dict[str, Any]] = {
        "command": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
            ]
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
        """``base`` is the working folder; a relative ``cwd`` is taken from it."""
        return {**payload, "cwd": str((base / payload.get("cwd", ".")).resolve())}

    def prepare(self, attempt: Attempt) -> None:
        pass

    def run(self, attempt: Attempt) -> Outcome:
        payload = attempt.job.payload
        shell = "shell" in payload
        return run_process(
            attempt,
            payload["shell"] if shell else payload["argv"],
            shell=shell,
            cwd=payload.get("cwd"),
            env=payload.get("env", {}),
        )

    def stop(self, attempt: Attempt, reason: str) -> bool:
        attempt.stop(reason)  # SIGTERM to its process group, SIGKILL after a grace
        return True

    def collect(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        return outcome


KIND = Command()
