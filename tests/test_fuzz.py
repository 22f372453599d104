"""Fuzz every operation of /openapi.json with schemathesis against a real server and database:
valid and invalid inputs, with and without a token, never a 5xx and always a JSON error."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import psycopg
import pytest
import requests
from conftest import create_database, drop_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from processes import ApiServer
from starlette.routing import Mount, Route

import smifdb
from smifdb.api import create_app, openapi, runners
from smifdb.store import auth

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from schemathesis.generation.modes import GenerationMode  # noqa: E402

PASSWORD = "fuzzing password"
EXAMPLES = int(os.environ.get("SMIFDB_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def fuzz_dsn(pg_server: str, template_db: str) -> Iterator[str]:
    name = f"smifdb_fuzz_{os.getpid()}"
    dsn = create_database(pg_server, name, template=template_db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        auth.add_user(conn, "fuzzer", PASSWORD)
    yield dsn
    drop_database(pg_server, name)


@pytest.fixture(scope="module")
def server(fuzz_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    app = create_app(fuzz_dsn, max_body=50_000)
    s = ApiServer(app)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token(server: ApiServer) -> str:
    form = {"grant_type": "password", "username": "fuzzer", "password": PASSWORD}
    response = requests.post(f"{server.url}{openapi.TOKEN_PATH.format(realm='x')}", data=form)
    return response.json()["access_token"]


def check(case, response) -> None:
    where = f"{case.method} {case.formatted_path} body={case.body!r}"[:400]
    assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])  # schemathesis: value lists
        if case.path == "/login":  # a person's form: its errors are the page again, in words
            assert content_type[0].startswith("text/html"), where
            return
        assert content_type[0].startswith("application/json"), where
        assert isinstance(response.json(), dict), where


def _operations(server: ApiServer) -> list:
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_operation_gives_a_5xx(server, token, mode) -> None:
    """Each operation gets EXAMPLES generated requests, with a token and without one."""
    operations = _operations(server)
    labels = {op.label for op in operations}
    documented = {f"{m.upper()} {p}" for p, ops in openapi.PATHS.items() for m in ops}
    assert labels == documented - {"GET /openapi.json"}  # schemathesis skips the schema itself
    headers = {"Authorization": f"Bearer {token}"}
    tried = 0
    skipped: list[str] = []
    for operation in operations:
        strategy = operation.as_strategy(GenerationMode(mode))

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case) -> None:
            nonlocal tried
            tried += 1
            check(case, case.call(base_url=server.url, headers=headers))
            check(case, case.call(base_url=server.url))

        try:
            fuzz()
        except Unsatisfiable:  # nothing invalid to send, e.g. GET /models/: no input at all
            assert mode == "negative", operation.label
            skipped.append(operation.label)
    assert tried >= len(operations) - len(skipped)
    assert len(skipped) < len(operations) / 2, skipped


def test_every_route_is_documented() -> None:
    app = create_app("postgresql://unused")
    documented = {(path, method.upper()) for path, ops in openapi.PATHS.items() for method in ops}
    served = set()
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        served |= {(path, m) for m in route.methods or () if m != "HEAD"}
    assert served == documented


def _bomb() -> bytes:
    """A billion laughs as a model definition: 9**9 strings through nine levels of aliases."""
    text = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return (text + "kind: M\nmetadata: *l8\n").encode()


# What schemathesis does not think of: each was a 500, a stall or a 73 MB row somewhere.
HOSTILE = {
    "990 nested lists": b"[" * 990 + b"]" * 990,
    "20,000 nested objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "NaN": b'{"definition": {"kind": "W", "x": NaN}, "version_message": "m", "x": NaN}',
    "-Infinity": b'{"kind": "P", "metadata": {"x": -Infinity}, "jobs": [-Infinity]}',
    "a YAML alias bomb": _bomb(),
    "NUL everywhere": (
        b'{"kind": "M", "metadata": {"name": "\\u0000"}, "version_message": "\\u0000", '
        b'"definition": {"kind": "W", "metadata": {"name": "\\u0000"}}, '
        b'"jobs": [{"key": "\\u0000", "command": "\\u0000"}], "args": {"\\u0000": 1}}'
    ),
    "unhashable kinds": (
        b'{"kind": ["M"], "definition": {"kind": "W", "spec": {"steps": {"a": {"kind": '
        b'["model"]}}}}, "spec": {"a": [1], "b": {"parameters": [5, {"name": ["N"]}]}}}'
    ),
    "a key past a btree row": b'{"jobs": [{"key": "' + b"k" * 3000 + b'", "command": "true"}]}',
    "not UTF-8": b"\xff\xfe{\x00",
    "an unterminated string of escaped quotes": b"[" * 70 + b'"' + b'\\"' * 20_000,
    "a lone surrogate": b'{"version_message": "\\ud800"}',
}
TOKEN_FORMS = {
    "NUL in a user name": b"grant_type=password&username=al%00ice&password=x",
    "a long user name": b"grant_type=password&username=" + b"a" * 40_000 + b"&password=x",
    "not UTF-8": b"grant_type=password&username=\xff&password=x",
}


def test_hostile_bodies_on_every_operation(server, token) -> None:
    """Every operation that takes a body, sent each hostile body: a JSON 4xx within a second
    (the event loop is never held), with a token and without one."""
    headers = {"Authorization": f"Bearer {token}"}
    placeholders = {"name": "x", "realm": "Production", "workflow_id": "1", "job_id": "1"}
    zero = "00000000-0000-0000-0000-000000000000"
    sent = 0
    for path, operations in openapi.PATHS.items():
        for method in operations:
            if method not in ("post", "put"):
                continue
            url = server.url + re.sub(
                r"\{(\w+)\}", lambda m: placeholders.get(m.group(1), zero), path
            )
            bodies = TOKEN_FORMS if "openid-connect" in path else HOSTILE
            for label, body in bodies.items():
                for with_token in (headers, {}):
                    started = time.monotonic()
                    response = requests.request(
                        method, url, data=body, headers=with_token, timeout=10
                    )
                    elapsed = time.monotonic() - started
                    where = f"{method.upper()} {path} with {label}"
                    assert response.status_code < 500, f"{where}: {response.text[:300]}"
                    assert elapsed < 1, f"{where} took {elapsed:.1f} s"
                    if response.status_code >= 400 and path != "/login":  # the login page: HTML
                        assert response.headers["content-type"].startswith("application/json")
                        assert isinstance(response.json(), dict), where
                    sent += 1
    assert sent > 200


MODEL = {
    "kind": "M",
    "api_version": "v1beta3",
    "metadata": {"display_name": "M", "name": "m", "summary": "s", "description": "d"},
    "spec": {
        "command": "true",
        "timeout": 5,
        "inputs": {
            "parameters": [
                {"name": "N", "type": "integer", "default": 1, "required": True},
                {"name": "S", "type": "string"},
            ],
            "dataslots": [{"name": "d", "path": "inputs/"}],
        },
        "outputs": {"datasets": [{"name": "out"}]},
    },
}
ODD_VALUES = [None, True, -1, "", "x", ["model"], {"a": [1]}, "a" * 3000]


def _mutations(value: object, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, odd value) for every place in a definition, and for a new key in each mapping."""
    found = [(path, odd) for odd in ODD_VALUES] if path else []
    if isinstance(value, dict):
        found += [((*path, "extra"), odd) for odd in ODD_VALUES[:4]]
        for key, child in value.items():
            found += _mutations(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _mutations(child, (*path, i))
    return found


def _mutated(value: object, path: tuple, odd: object) -> object:
    copy = json.loads(json.dumps(value))
    *parents, last = path
    target = copy
    for key in parents:
        target = target[key]
    target[last] = odd
    return copy


def test_every_field_of_every_definition_given_odd_values(server, token) -> None:
    """Each field of a model, workflow and parameter set replaced by each odd value (a list
    where a mapping goes, a number for a step, an unhashable kind…), and each definition that
    is accepted then read back and executed: never a 5xx."""
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    base = server.url

    def call(method: str, path: str, what: str, **kwargs) -> requests.Response:
        response = api.request(method, base + path, timeout=30, **kwargs)
        assert response.status_code < 500, f"{method} {path} {what}: {response.text[:300]}"
        return response

    def add_model(definition: dict, what: str) -> str | None:
        upload = call("POST", "/models/upload/", what, json={}).json()
        put = call("PUT", f"/models/upload/{upload['id']}/definition/", what, json=definition)
        if put.status_code != 204:
            return None
        ingested = call("POST", f"/models/upload/{upload['id']}/ingest/", what, json={})
        return ingested.json()["version_id"]

    def run(workflow: str, definition: dict, what: str) -> None:
        ps = call("POST", "/workflows/parameter-set/upload/", what, json=definition)
        if ps.status_code == 201:
            executed = call("POST", f"/workflows/execute/{workflow}/{ps.json()['id']}/", what)
            if executed.status_code == 201:
                call("GET", f"/workflows/instances/{executed.json()['instance_id']}/", what)

    model = add_model(MODEL, "the model")
    assert model
    tried = 0
    for path, odd in _mutations(MODEL):
        what = f"model {'.'.join(map(str, path))} = {odd!r:.40}"
        if version := add_model(_mutated(MODEL, path, odd), what):
            call("GET", f"/models/{version}/", what)
        tried += 1
    call("GET", "/models/", "after the models")

    steps = {
        "a": {"kind": "model", "name": "a", "dependencies": [], "model_version": model},
        "b.2": {"kind": "model", "name": "b", "inputs": ["a"], "model_version": model},
        "p": {"kind": "publisher", "name": "p", "dependencies": ["b.2"], "inputs": ["b.2"]},
    }
    workflow = {
        "kind": "W",
        "api_version": "v1.0.2",
        "metadata": {"display_name": "W", "name": "w", "summary": "s"},
        "spec": {"steps": steps},
    }
    values = {"parameters": [{"name": "N", "value": 2}, {"name": "S", "value": "s"}]}
    parameter_set = {
        "kind": "P",
        "api_version": "v1.0.0",
        "metadata": {"display_name": "P", "name": "p", "workflow_version": "WORKFLOW"},
        "spec": {"a": {**values, "dataslots": []}, "b.2": values},
    }
    for path, odd in _mutations(workflow):
        what = f"workflow {'.'.join(map(str, path))} = {odd!r:.40}"
        body = {"definition": _mutated(workflow, path, odd), "version_message": "m"}
        uploaded = call("POST", "/workflows/upload/", what, json=body)
        if uploaded.status_code == 201:
            version = uploaded.json()["id"]
            call("GET", f"/workflows/{version}/", what)
            ps = json.loads(json.dumps(parameter_set).replace("WORKFLOW", version))
            run(version, {**ps, "spec": {}}, what)
        tried += 1
    call("GET", "/workflows/", "after the workflows")

    body = {"definition": workflow, "version_message": "m"}
    version = call("POST", "/workflows/upload/", "the workflow", json=body).json()["id"]
    parameter_set = json.loads(json.dumps(parameter_set).replace("WORKFLOW", version))
    for path, odd in _mutations(parameter_set):
        what = f"parameter set {'.'.join(map(str, path))} = {odd!r:.40}"
        mutated = _mutated(parameter_set, path, odd)
        call("POST", "/workflows/parameter-set/validate/", what, json=mutated)
        run(version, mutated, what)
        tried += 1
    call("GET", f"/workflows/{version}/", "after the parameter sets")
    assert tried > 500


# -- the runner protocol, fuzzed with a runner token and its own field names -----------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SMALL_IDS = st.integers(0, 8)  # the ids of the jobs and workflow submitted below
NAMES = st.sampled_from(["fuzzrunner/r", "fuzzrunner/", "other/r", "r", "fuzzrunner/\x00"])
OUTCOME = st.fixed_dictionaries(
    {
        "job_id": SMALL_IDS | JSON,
        "workflow_id": SMALL_IDS | JSON,
        "attempt": SMALL_IDS | JSON,
        "owner": NAMES | JSON,
        "status": st.sampled_from(["succeeded", "failed", "cancelled", "released", "x"]) | JSON,
    },
    optional={
        name: JSON | SMALL_IDS
        for name in (
            "max_attempts",
            "retry_backoff",
            "result",
            "exit_code",
            "error",
            "log_tail",
            "reason",
            "key",
            "claimed_at",
            "claim_id",
            "outputs",
            "bogus",
        )
    },
)
ONE_ID = st.lists(SMALL_IDS, min_size=1, max_size=1)  # lists of one length: a valid group
GROUP = st.fixed_dictionaries(  # plain successes of one claim, as `batch` takes them
    {
        "claim_id": SMALL_IDS | st.none() | JSON,
        "claimed_at": st.just("2026-12-06T10:00:00+00:00") | JSON,
        "reason": st.sampled_from(["returned", None]) | JSON,
        "jobs": ONE_ID | JSON,
        "workflows": ONE_ID | JSON,
        "attempts": ONE_ID | JSON,
    },
    optional={"bogus": JSON},
)
FIELDS = {
    "runner": NAMES | JSON,
    "done": st.lists(GROUP, max_size=2) | JSON,
    "host": st.text(max_size=300) | JSON,
    "pid": SMALL_IDS | JSON,
    "slots": SMALL_IDS | JSON,
    "dead_after": st.floats() | JSON,
    "max_losses": SMALL_IDS | JSON,
    "counts": st.dictionaries(st.text(max_size=8), SMALL_IDS | JSON, max_size=3) | JSON,
    "attempts": st.dictionaries(st.text(max_size=4), SMALL_IDS | JSON, max_size=3) | JSON,
    "lease": st.floats() | JSON,
    "outcomes": st.lists(OUTCOME, max_size=3) | JSON,
    "claim": SMALL_IDS | JSON,
    "workflow_id": SMALL_IDS | JSON,
    "model_run_id": SMALL_IDS | JSON,
    "close": st.lists(SMALL_IDS) | JSON,
    "recheck": st.lists(SMALL_IDS) | JSON,
    "known": st.lists(SMALL_IDS) | JSON,
    "defer_settle": st.booleans() | JSON,
    "state": st.sampled_from(["draining", "stopped", "active", "lost"]) | JSON,
    "files": st.booleans() | JSON,
    "inputs": st.lists(st.text(max_size=8), max_size=3) | JSON,
    "sha256": st.lists(st.text("0123456789abcdef", min_size=64, max_size=64), max_size=3) | JSON,
}


# A body every operation accepts; each example replaces or drops some of its fields.
BASE = {
    "runner": "fuzzrunner/r",
    "host": "fuzzhost",
    "pid": 1,
    "slots": 2,
    "lease": 30,
    "claim": 1,
    "outcomes": [],
    "known": [],
    "state": "draining",
    "workflow_id": 1,
    "model_run_id": 1,  # none such: every operation answers for it, model_run_inputs too
    "inputs": [],
    "sha256": [],
}


@pytest.fixture(scope="module")
def runner_token(fuzz_dsn: str, server: ApiServer) -> str:
    """A runner token and its registered runner, and a small workflow whose job and workflow
    ids the fuzzer aims at."""
    with psycopg.connect(fuzz_dsn, autocommit=True) as conn:
        auth.add_user(conn, "fuzzrunner", PASSWORD, role="runner")
        smifdb.submit(conn, {"jobs": [{"key": f"j{i}", "command": "true"} for i in range(6)]})
        token = auth.create_api_token(conn, "fuzzrunner", name="fuzz", seconds=None)[1]
    answer = requests.post(
        f"{server.url}{runners.PREFIX}/register",
        json=BASE,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.ok, answer.text
    return token


@pytest.mark.parametrize("op", sorted(runners.OPS))
def test_the_runner_protocol_never_gives_a_5xx(server, runner_token, op) -> None:
    """Bodies built from the protocol's own field names, with values right and wrong, from a
    runner's token: a JSON answer or a JSON 4xx, never a 5xx; and the server still answers.
    Each operation must also succeed for some of them (else the fuzzer only met the checks)."""
    headers = {"Authorization": f"Bearer {runner_token}"}
    url = f"{server.url}{runners.PREFIX}/{op}"
    changed = st.fixed_dictionaries({}, optional=FIELDS | {"bogus": JSON})
    dropped = st.sets(st.sampled_from(sorted(BASE)), max_size=3)
    body = st.tuples(changed, dropped).map(
        lambda pair: {k: v for k, v in {**BASE, **pair[0]}.items() if k not in pair[1]}
    )
    if op == "wait":  # without a timeout it waits 25 s, as it should
        body = st.tuples(body, st.floats(0, 0.05) | st.text(max_size=4) | JSON).map(
            lambda pair: {**pair[0], "timeout": pair[1] if pair[1] is not None else 0}
        )
    seen: dict[int, int] = {}

    @given(data=body)
    @settings(
        max_examples=EXAMPLES * 2,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(data) -> None:
        try:
            payload = json.dumps(data, allow_nan=False).encode()
        except ValueError:  # NaN: the hostile-bodies test sends those
            return
        response = requests.post(
            url, data=payload, headers={**headers, "Content-Type": "application/json"}, timeout=30
        )
        where = f"POST {op} {payload[:300]!r}"
        assert response.status_code < 500, (
            f"{where} -> {response.status_code}: {response.text[:500]}"
        )
        assert response.headers["content-type"].startswith("application/json"), where
        assert isinstance(response.json(), dict), where
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    fuzz()
    assert seen.get(200, 0) >= 3, seen
    assert requests.post(f"{server.url}{runners.PREFIX}/hello", json={}, headers=headers).ok
