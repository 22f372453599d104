"""``python`` jobs: ``module:function(**args)``, if the runner allows that callable
(smifdb.execute.allowed_callable), called in one of the runner's warm worker processes
(smifdb.workers): a stopped attempt's worker is killed, and a job that ends its process fails
only its attempt. With ``--python-in-thread``, called in the slot thread instead: a thread
cannot be killed, so a stopped attempt is recorded at once and its call left to return."""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from smifdb.execute import LOG_TAIL_BYTES, Attempt, NotAllowed, allowed_callable, call_in_worker
from smifdb.kinds import common
from smifdb.limits import MAX_DEPTH, too_deep
from smifdb.pgtext import unstorable
from smifdb.store.queue import Outcome
from smifdb.workers import Answer, WorkerPool

TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class Python:
    name = "python"
    # cwd and env are accepted (and stored) as ever, though a call in a thread uses neither.
    spec_fields = frozenset({"python", "args"}) | common.FIELDS
    # Why other kinds' fields are not this one's, where a reason helps (kinds.parse).
    refuses: ClassVar[dict[str, str]] = dict.fromkeys(
        ("inputs", "outputs"),
        ": a python job runs in the runner's own thread, with no folder of its own for files "
        "(use a command job)",
    )
    spec_schema: ClassVar[dict[str, Any]] = {
        "python": {"type": "string", "examples": ["smifdb.examples:noop"]},
        "args": {"type": "object"},
        **common.SCHEMA,
    }

    def parse(self, raw: Mapping[str, Any], where: str, problems: list[str]) -> dict | None:
        start = len(problems)
        target = raw["python"]
        if not isinstance(target, str) or not TARGET.match(target):
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
        common.parse_cwd_env(raw, where, problems, payload)
        return payload if len(problems) == start else None

    def with_base_dir(self, payload: dict[str, Any], base: Path) -> dict[str, Any]:
        return payload

    def prepare(self, attempt: Attempt) -> None:
        pass

    def run(self, attempt: Attempt) -> Outcome:
        if attempt.policy.workers is not None:
            return self._in_worker(attempt, attempt.policy.workers)
        payload = attempt.job.payload
        try:
            function = allowed_callable(payload["function"], attempt.policy.python_allow)
            value = function(**payload.get("args", {}))
            if value is not None and (why := unstorable(value)):
                raise ValueError(f"the returned value cannot be stored as JSON: {why}")
        except NotAllowed as exc:  # for good: a runner like this one would refuse it as well
            error = f"{exc} (runner {attempt.owner})"
            return attempt.outcome("failed", final=True, error=error, reason="callable not allowed")
        except BaseException as exc:  # whatever a job raises, sys.exit() too, fails it; slot lives
            tail = traceback.format_exc()[-LOG_TAIL_BYTES:]
            if attempt.stop_reason is not None:
                return attempt.stopped_outcome(log_tail=tail)
            error = f"{type(exc).__name__}: {exc}"
            return attempt.outcome("failed", error=error[:2000], log_tail=tail, reason="exception")
        if attempt.stop_reason is not None:
            return attempt.stopped_outcome()
        return attempt.outcome("succeeded", result=value, reason="returned")

    def _in_worker(self, attempt: Attempt, pool: WorkerPool) -> Outcome:
        payload = attempt.job.payload
        args = payload.get("args", {})
        answer, died = call_in_worker(attempt, pool.take(), payload["function"], args)
        if answer is None:
            if attempt.stop_reason is not None:
                return attempt.stopped_outcome()
            error = f"the job ended its process: {died}"
            return attempt.outcome("failed", error=error, reason="worker died")
        return self._answered(attempt, answer)

    def _answered(self, attempt: Attempt, answer: Answer) -> Outcome:
        if answer.kind == "not_allowed":  # for good, as in a thread
            error = f"{answer.error} (runner {attempt.owner})"
            return attempt.outcome("failed", final=True, error=error, reason="callable not allowed")
        if attempt.stop_reason is not None:
            return attempt.stopped_outcome(log_tail=answer.tail)
        if answer.kind == "error":
            return attempt.outcome(
                "failed", error=answer.error, log_tail=answer.tail, reason="exception"
            )
        return attempt.outcome("succeeded", result=answer.value, reason="returned")

    def stop(self, attempt: Attempt, reason: str) -> bool:
        attempt.stop(reason)  # in a thread, only marks it: there is no process to signal
        if attempt.policy.workers is None:
            return False
        worker = attempt.worker
        if worker is not None:
            worker.kill()  # its slot thread then records the stopped attempt
        return True

    def collect(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        return outcome


KIND = Python()


def callables(jobs: Any) -> tuple[str, ...]:
    """The callables a DAG's python jobs name, sorted, each once."""
    return tuple(sorted({j.payload["function"] for j in jobs if j.kind == KIND.name}))
