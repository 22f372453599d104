"""Job kinds behind one seam: the registry in smifdb/kinds/ is what the spec, the runner's
dispatch, the OpenAPI schema, the docs and the database's job_kind enum agree on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from smifdb import kinds, spec, states
from smifdb.api import openapi
from smifdb.cli import main
from smifdb.execute import Attempt
from smifdb.store.queue import ClaimedJob

DOCS = Path(__file__).parent.parent / "docs"


def test_the_registry_states_and_the_database_enum_name_the_same_kinds(conn) -> None:
    enum = conn.execute("SELECT enum_range(NULL::job_kind)::text[]").fetchone()[0]
    assert tuple(kinds.KINDS) == states.JOB_KINDS == tuple(enum)
    for name, kind in kinds.KINDS.items():
        assert kind.name == name and name in kind.spec_fields  # its field selects it
        assert set(kind.spec_schema) <= kind.spec_fields


def test_every_kind_field_is_in_the_openapi_job_schema_and_the_spec_docs() -> None:
    job = openapi.DAG_SPEC["properties"]["jobs"]["items"]["properties"]
    example = re.search(r"```yaml\n(.*?)```", (DOCS / "dags.md").read_text(), re.S).group(1)
    documented = set(re.findall(r"^\s+-?\s*(\w+):", example, re.M))
    for kind in kinds.KINDS.values():
        assert kind.spec_fields <= set(job), kind.name
        assert kind.spec_fields <= documented, kind.name
    assert documented >= spec.COMMON_JOB_FIELDS


def test_a_job_of_no_known_kind_is_refused_naming_the_kinds(conn, dsn, tmp_path) -> None:
    path = tmp_path / "dag.yaml"
    path.write_text("jobs:\n  - {key: a, teleport: run}\n  - {key: b, command: 'true', args: {}}\n")
    result = CliRunner().invoke(main, ["--dsn", dsn, "submit", str(path)])
    assert result.exit_code == 2, result.output
    assert "job 'a': unknown field(s) teleport" in result.output
    assert "job 'a': give exactly one of 'command', 'python' or 'smif'" in result.output
    assert "job 'b': 'args' goes with 'python', not 'command'" in result.output
    assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 0  # nothing written


def _attempt(kind: str, payload: dict[str, Any], tmp_path: Path) -> Attempt:
    job = ClaimedJob(1, 1, "a", kind, payload, 1, 3, None, 1.0)
    return Attempt(job, "runner-x", tmp_path)


def test_a_claimed_job_of_a_kind_this_runner_does_not_know_fails_clearly(tmp_path) -> None:
    outcome = kinds.run_attempt(_attempt("teleport", {"project": "p"}, tmp_path))
    assert outcome.status == "failed"
    assert outcome.error == "job kind 'teleport' is unknown to this runner"
    assert outcome.max_attempts == 3  # another runner may know it: the retry is kept


class Echo:
    """A kind made of one module's worth of code, registered by one line."""

    name = "echo"
    spec_fields = frozenset({"echo", "times"})
    spec_schema: ClassVar[dict[str, Any]] = {"echo": {"type": "string"}}
    calls: ClassVar[list[str]] = []

    def parse(self, raw, where, problems):  # type: ignore[no-untyped-def]
        if not isinstance(raw["echo"], str):
            problems.append(f"{where}: 'echo' must be a string")
            return None
        return {"text": raw["echo"], "times": raw.get("times", 1)}

    def with_base_dir(self, payload, base):  # type: ignore[no-untyped-def]
        return payload

    def prepare(self, attempt):  # type: ignore[no-untyped-def]
        self.calls.append("prepare")

    def run(self, attempt):  # type: ignore[no-untyped-def]
        self.calls.append("run")
        text = attempt.job.payload["text"] * attempt.job.payload["times"]
        status = "failed" if text == "" else "succeeded"
        return attempt.outcome(status, result=text, reason="echoed")

    def stop(self, attempt, reason):  # type: ignore[no-untyped-def]
        attempt.stop(reason)
        return True

    def collect(self, attempt, outcome):  # type: ignore[no-untyped-def]
        self.calls.append("collect")
        outcome.result = {"collected": outcome.result}
        return outcome


def test_a_new_kind_is_one_module_and_one_registry_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(kinds.KINDS, "echo", Echo())
    dag = spec.parse({"jobs": [{"key": "a", "echo": "hi", "times": 2, "after": []}]})
    assert (dag.jobs[0].kind, dag.jobs[0].payload) == ("echo", {"text": "hi", "times": 2})
    with pytest.raises(spec.SpecError) as refused:
        spec.parse({"jobs": [{"key": "a", "command": "true", "times": 2}, {"key": "b"}]})
    assert "job 'a': 'times' goes with 'echo', not 'command'" in str(refused.value)
    assert "give exactly one of 'command', 'python', 'smif' or 'echo'" in str(refused.value)

    Echo.calls.clear()
    outcome = kinds.run_attempt(_attempt("echo", {"text": "hi", "times": 2}, tmp_path))
    assert (outcome.status, outcome.result) == ("succeeded", {"collected": "hihi"})
    assert Echo.calls == ["prepare", "run", "collect"]
    Echo.calls.clear()
    failed = kinds.run_attempt(_attempt("echo", {"text": "", "times": 1}, tmp_path))
    assert failed.status == "failed" and Echo.calls == ["prepare", "run"]  # no collect
