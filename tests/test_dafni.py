"""The DAFNI shim against DAFNI's own client: dafni-cli's API functions and parsers, and its
command line, pointed at a real server on a real database, with a real runner executing."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import credentials
import httpx2
import pytest
import yaml
from processes import FAST, PY, ApiServer, hide, require_namespaces, wait_for
from starlette.testclient import TestClient
from test_http_runners import http_runner, socket_folder

from smifdb.api import create_app
from smifdb.store import auth
from smifdb.store import dafni as rows

dafni_cli = pytest.importorskip("dafni_cli", reason="dafni-cli is in the test extra")

from dafni_cli.api import minio_api, models_api, session, workflows_api  # noqa: E402
from dafni_cli.api.exceptions import DAFNIError, ValidationError  # noqa: E402
from dafni_cli.models.model import parse_model, parse_models  # noqa: E402
from dafni_cli.workflows.instance import parse_workflow_instance  # noqa: E402
from dafni_cli.workflows.workflow import parse_workflow, parse_workflows  # noqa: E402

PASSWORD = "correct horse battery"
MODEL = {
    "kind": "M",
    "api_version": "v1beta3",
    "metadata": {
        "display_name": "Doubler",
        "name": "doubler",
        "summary": "Writes a number, or twice the number it is given",
        "description": "A model for tests.",
    },
    "spec": {
        # Step 'count' writes N; 'double' reads what 'count' wrote and writes 2N.
        "command": "if [ -f inputs/count/n.txt ]; then echo $(( $(cat inputs/count/n.txt) * 2 ))"
        ' > outputs/n.txt; else echo "$N" > outputs/n.txt; fi; echo "flag=$FLAG"',
        "inputs": {
            "parameters": [
                {
                    "name": "N",
                    "type": "integer",
                    "title": "N",
                    "required": True,
                    "description": "how many",
                    "default": 1,
                },
                {"name": "FLAG", "type": "boolean", "default": False},
            ]
        },
    },
}


def workflow_definition(model_version: str, **steps_override) -> dict:
    steps = {
        "count": {
            "kind": "model",
            "name": "count",
            "dependencies": [],
            "model_version": model_version,
        },
        "double": {
            "kind": "model",
            "name": "double",
            "dependencies": ["count"],
            "inputs": ["count"],
            "model_version": model_version,
        },
        "publish": {
            "kind": "publisher",
            "name": "publish",
            "dependencies": ["double"],
            "inputs": ["double"],
            "metadata": {"in_step": {"dct:title": "Results"}},
        },
    }
    steps.update(steps_override)
    return {
        "kind": "W",
        "api_version": "v1.0.2",
        "metadata": {
            "display_name": "Count and double",
            "name": "count-double",
            "summary": "Two model steps and a publisher",
            "description": "For tests.",
        },
        "spec": {"steps": steps},
    }


def parameter_set(workflow_version: str, n: object = 21) -> dict:
    return {
        "kind": "P",
        "api_version": "v1.0.0",
        "metadata": {
            "display_name": "N is 21",
            "name": "n-21",
            "description": "",
            "publisher": "alice",
            "workflow_version": workflow_version,
        },
        "spec": {
            "count": {
                "kind": "model",
                "parameters": [{"name": "N", "value": n}, {"name": "FLAG", "value": True}],
                "dataslots": [],
            }
        },
    }


def add_user(
    dsn: str, name: str = "alice", password: str = PASSWORD
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "smifdb.cli", "--dsn", dsn, "api", "user", "add", name, "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
    )


@pytest.fixture
def server(dsn: str, tmp_path: Path) -> Iterator[ApiServer]:
    assert add_user(dsn).returncode == 0
    s = ApiServer(create_app(dsn))
    yield s
    s.stop()


@pytest.fixture
def dafni(server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """dafni-cli pointed here, the only way it allows: its module-level URLs rebound."""
    login = f"{server.url}/realms/Production/protocol/openid-connect/token/"
    for module in (dafni_cli.consts, workflows_api, models_api):
        monkeypatch.setattr(module, "NIMS_API_URL", server.url)
    for module in (dafni_cli.consts, session):
        monkeypatch.setattr(module, "LOGIN_API_ENDPOINT", login)
        monkeypatch.setattr(module, "LOGOUT_API_ENDPOINT", login.replace("token/", "logout"))
    return server.url


def upload_model(user_session, tmp_path: Path, definition: dict = MODEL) -> str:
    """dafni-cli's own model upload: validate, upload URLs, PUT both files, ingest."""
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(definition))
    image = tmp_path / "image.tar"
    image.write_bytes(b"\0" * 4096)
    models_api.validate_model_definition(user_session, path)
    upload_id, urls = models_api.get_model_upload_urls(user_session)
    minio_api.upload_file_to_minio(user_session, urls["definition"], path)
    minio_api.upload_file_to_minio(user_session, urls["image"], image)
    return models_api.model_version_ingest(user_session, upload_id, "first")["version_id"]


def stored_outputs(user, base: str, instance_id: str, raw: dict) -> dict[str, dict[str, bytes]]:
    """Each model step's stored outputs, read through the API: the step lists, their files,
    and each produced asset's list (which must name some of the same files)."""
    got: dict[str, dict[str, bytes]] = {}
    for step in raw["step_status"]:
        url = f"{base}/workflows/instances/{instance_id}/steps/{step}/outputs/"
        for row in user.get_request(url=url)["files"]:
            body = user.get_request(url=row["url"], content_type="", stream=True)
            assert body.headers["content-disposition"].startswith("attachment;")
            assert body.headers["etag"] == f'"{row["sha256"]}"'
            got.setdefault(step, {})[row["path"]] = body.content
            assert len(body.content) == row["size"]
    stored = {(step, path) for step, files in got.items() for path in files}
    for asset in raw["produced_assets"].values():  # the files of the steps it publishes
        listed = user.get_request(url=asset["files_url"])["files"]
        assert listed and {(f["step_id"], f["path"]) for f in listed} <= stored
    return got


@pytest.mark.parametrize("transport", ["direct", "http"])
def test_dafni_cli_upload_list_get_execute_poll_to_succeeded(
    dafni, tmp_path, procs, transport
) -> None:
    """… run by a direct runner, or by an HTTP runner that reaches neither the database nor
    any file here: only the API's URL, with a runner token."""
    user = session.DAFNISession.login("alice", PASSWORD)
    model_version = upload_model(user, tmp_path)
    models = parse_models(models_api.get_all_models(user))
    assert [m.model_id for m in models] == [model_version]
    model = parse_model(models_api.get_model(user, model_version))
    assert [p.name for p in model.spec.inputs.parameters] == ["N", "FLAG"]

    wf_file = tmp_path / "workflow.json"
    wf_file.write_text(json.dumps(workflow_definition(model_version)))
    cyclic = workflow_definition(model_version)
    cyclic["spec"]["steps"]["count"]["dependencies"] = ["double"]
    bad_file = tmp_path / "cyclic.json"
    bad_file.write_text(json.dumps(cyclic))
    with pytest.raises(DAFNIError, match="dependency cycle"):
        workflows_api.upload_workflow(user, bad_file, "cyclic")
    version_id = workflows_api.upload_workflow(user, wf_file, "first version")["id"]
    listed = parse_workflows(workflows_api.get_all_workflows(user))
    assert [w.workflow_id for w in listed] == [version_id]
    assert listed[0].metadata.display_name == "Count and double"

    ps_file = tmp_path / "ps.json"
    ps_file.write_text(json.dumps(parameter_set(version_id, n=1.5)))
    with pytest.raises(ValidationError, match="must be of type integer"):
        workflows_api.validate_parameter_set_definition(user, ps_file)
    ps_file.write_text(json.dumps(parameter_set(version_id)))
    workflows_api.validate_parameter_set_definition(user, ps_file)
    parameter_set_id = workflows_api.upload_parameter_set(user, ps_file)["id"]

    # dafni-cli has no execute call: its session sends ours, with its token handling.
    url = f"{dafni}/workflows/execute/{version_id}/{parameter_set_id}/"
    instance_id = user.post_request(url=url)["instance_id"]
    first = parse_workflow_instance(workflows_api.get_workflow_instance(user, instance_id))
    assert first.overall_status == "Pending"
    assert set(first.step_statuses) == {"count", "double", "publish"}

    # The runner as on another machine: the folder of every file here (dafni-cli's, the
    # server's) is an empty tmpfs in its mount namespace; steps' data reach it by the store.
    require_namespaces(tmp_path)
    if transport == "http":
        token = credentials.user_token(procs.dsn, "node", role="runner")
        hidden = [tmp_path, *socket_folder(procs.dsn)]
        runner = http_runner(dafni, token, tmp_path, "h0", hidden, "--slots", "2")
    else:
        runner_log = open(tmp_path / "runner.log", "ab")  # noqa: SIM115 - closed at the end
        argv = ["runner", "run", "--slots", "2", "--cache-dir", str(tmp_path / "cache"), *FAST]
        runner = subprocess.Popen(
            [*hide(tmp_path), PY, "-m", "smifdb.cli", "--dsn", procs.dsn, *argv],
            stdout=runner_log,
            stderr=subprocess.STDOUT,
        )
    procs.procs.append(runner)

    def finished():
        raw = workflows_api.get_workflow_instance(user, instance_id)
        return raw if raw["overall_status"] not in ("Pending", "Running") else None

    raw = wait_for(finished, timeout=60, what="the instance to finish")
    instance = parse_workflow_instance(raw)
    assert instance.overall_status == "Succeeded", raw
    assert {k: s.status for k, s in instance.step_statuses.items()} == dict.fromkeys(
        ("count", "double", "publish"), "Succeeded"
    )
    assert instance.finished_time >= instance.submission_time
    assert list(instance.produced_assets) == ["publish"]
    assert raw["produced_assets"]["publish"]["kind"] == "publisher"
    # The steps' outputs and the published asset's files, through the API, by dafni-cli's
    # own session (its token on every request).
    assert stored_outputs(user, dafni, instance_id, raw) == {
        "count": {"outputs/n.txt": b"21\n"},
        "double": {"outputs/n.txt": b"42\n"},
    }

    workflow = parse_workflow(workflows_api.get_workflow(user, version_id))
    assert [i.instance_id for i in workflow.instances] == [instance_id]
    assert [p.parameter_set_id for p in workflow.parameter_sets] == [parameter_set_id]
    assert workflow.instances[0].overall_status == "Succeeded"

    # A second version under the first's parent shares its version history.
    second = workflows_api.upload_workflow(user, wf_file, "second", parent_id=workflow.parent_id)
    history = parse_workflow(workflows_api.get_workflow(user, second["id"])).version_history
    assert [v.version_id for v in history] == [second["id"], version_id]


def test_dafni_cli_command_line_against_the_shim(dafni, tmp_path, procs) -> None:
    """The real `dafni` command, run in its own process with only its URLs rebound."""
    wrapper = tmp_path / "dafni_local.py"
    wrapper.write_text(
        "import sys\n"
        "import dafni_cli.consts as c, dafni_cli.api.session as s\n"
        "import dafni_cli.api.workflows_api as w, dafni_cli.api.models_api as m\n"
        "base = sys.argv.pop(1)\n"
        "for mod in (c, w, m): mod.NIMS_API_URL = base\n"
        "token = base + '/realms/Production/protocol/openid-connect/token/'\n"
        "for mod in (c, s):\n"
        "    mod.LOGIN_API_ENDPOINT = token\n"
        "    mod.LOGOUT_API_ENDPOINT = token.replace('token/', 'logout')\n"
        "from dafni_cli.dafni import dafni\n"
        "dafni()\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "DAFNI_USERNAME": "alice",
        "DAFNI_PASSWORD": PASSWORD,
        "PATH": "/usr/bin:/bin",
        "NO_PROXY": "127.0.0.1",
    }

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(wrapper), dafni, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    user = session.DAFNISession.login("alice", PASSWORD)
    model_version = upload_model(user, tmp_path)
    wf_file = tmp_path / "workflow.json"
    wf_file.write_text(json.dumps(workflow_definition(model_version)))
    uploaded = cli("upload", "workflow", str(wf_file), "-m", "from the cli", "-y")
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    version_id = uploaded.stdout.split("Version ID:")[1].strip()
    ps_file = tmp_path / "ps.json"
    ps_file.write_text(json.dumps(parameter_set(version_id)))
    ps = cli("upload", "workflow-parameter-set", str(ps_file), "-y")
    assert ps.returncode == 0 and "Upload successful" in ps.stdout, ps.stdout + ps.stderr
    bad = parameter_set(version_id, n="many")
    ps_file.write_text(json.dumps(bad))
    refused = cli("upload", "workflow-parameter-set", str(ps_file), "-y")
    assert refused.returncode == 1
    assert "must be of type integer" in refused.stdout

    listed = cli("get", "workflows")
    assert listed.returncode == 0 and version_id in listed.stdout, listed.stdout + listed.stderr
    shown = cli("get", "workflow", version_id)
    assert shown.returncode == 0 and "Count and double" in shown.stdout, shown.stderr
    models = cli("get", "models")
    assert models.returncode == 0 and model_version in models.stdout, models.stderr

    parameter_set_id = ps.stdout.split("Parameter set ID:")[1].strip()
    url = f"{dafni}/workflows/execute/{version_id}/{parameter_set_id}/"
    instance_id = user.post_request(url=url)["instance_id"]
    procs.start("--slots", "2", name="runner")
    wait_for(
        lambda: (
            workflows_api.get_workflow_instance(user, instance_id)["overall_status"] == "Succeeded"
        ),
        timeout=60,
        what="the instance to succeed",
    )
    got = cli("get", "workflow-instance", instance_id)
    assert got.returncode == 0 and "Succeeded" in got.stdout, got.stdout + got.stderr

    deleted = cli("delete", "workflow-version", version_id, stdin="y\n")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout, deleted.stdout
    gone = cli("get", "workflow", version_id)
    assert gone.returncode == 1 and "Unable to find a workflow" in gone.stdout


# -- bad input: JSON 4xx, nothing written ----------------------------------------------------


@pytest.fixture
def client(dsn: str, tmp_path: Path) -> Iterator[TestClient]:
    assert add_user(dsn).returncode == 0
    app = create_app(dsn, max_body=20_000)
    with credentials.client(app) as c:
        yield c


TOKEN = "/realms/Production/protocol/openid-connect/token/"


def login(client: TestClient, password: str = PASSWORD) -> httpx2.Response:
    form = {
        "grant_type": "password",
        "client_id": "dafni-main",
        "username": "alice",
        "password": password,
        "scope": "openid",
    }
    return client.post(TOKEN, data=form)


def bearer(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {login(client).json()['access_token']}"}


def problem(response: httpx2.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "error_message"}, body
    return body["error_message"] + " " + " ".join(body.get("errors", []))


def counts(conn) -> tuple[int, ...]:
    tables = (
        "dafni_models",
        "dafni_workflows",
        "dafni_parameter_sets",
        "dafni_instances",
        "workflows",
        "jobs",
    )
    return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)


def test_tokens_are_hashed_expire_and_refresh_once(client, conn) -> None:
    assert login(client, "wrong password").status_code == 401
    assert login(client, "wrong password").json()["error"] == "invalid_grant"
    tokens = login(client).json()
    assert tokens["expires_in"] > 60 and tokens["token_type"] == "Bearer"
    stored = [bytes(r[0]) for r in conn.execute("SELECT token_hash FROM api_tokens")]
    assert tokens["access_token"].encode() not in stored and len(stored) == 2
    password = conn.execute("SELECT password_hash FROM api_users").fetchone()[0]
    assert PASSWORD not in password and password.startswith("scrypt$")

    form = {
        "grant_type": "refresh_token",
        "client_id": "dafni-main",
        "refresh_token": tokens["refresh_token"],
    }
    renewed = client.post(TOKEN, data=form)
    assert renewed.status_code == 200 and renewed.json()["access_token"] != tokens["access_token"]
    headers = {"Authorization": f"Bearer {renewed.json()['access_token']}"}
    assert client.get("/workflows/", headers=headers).json() == []
    # A refresh token works once; presented again it was copied: the whole session ends,
    # the access token it was swapped for included.
    reused = client.post(TOKEN, data=form)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert client.get("/workflows/", headers=headers).status_code == 401
    assert client.post(TOKEN, data={"grant_type": "magic"}).status_code == 400

    headers = bearer(client)
    assert client.get("/workflows/", headers=headers).json() == []
    conn.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second'")
    expired = client.get("/workflows/", headers=headers)
    assert "expired" in problem(expired, 401)
    assert "invalid_token" in expired.headers["www-authenticate"]


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/workflows/"),
        ("GET", "/models/"),
        ("POST", "/workflows/upload/"),
        ("GET", "/workflows/instances/00000000-0000-0000-0000-000000000000/"),
        ("DELETE", "/workflows/00000000-0000-0000-0000-000000000000/"),
        ("POST", "/workflows/parameter-set/upload/"),
    ],
)
def test_every_dafni_route_needs_a_token(client, method, path) -> None:
    missing = client.request(method, path)
    assert "Bearer" in problem(missing, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    invalid = client.request(method, path, headers={"Authorization": "Bearer not-a-token"})
    problem(invalid, 401)


def test_bad_definitions_are_400_with_every_reason_and_nothing_written(client, conn) -> None:
    headers = bearer(client)
    before = counts(conn)
    upload = "/workflows/upload/"
    assert "malformed JSON" in problem(client.post(upload, content=b"{nope", headers=headers), 400)
    assert problem(client.post(upload, content=b"x" * 30_000, headers=headers), 413)
    assert problem(client.post(upload, json=[1, 2], headers=headers), 400)
    unknown_model = "11111111-1111-1111-1111-111111111111"
    wf = workflow_definition(unknown_model)
    text = problem(client.post(upload, json={"definition": wf}, headers=headers), 400)
    assert f"no model version {unknown_model}" in text

    model = client.post("/models/upload/", json={}, headers=headers).json()
    client.put(model["urls"]["definition"], content=yaml.safe_dump(MODEL), headers=headers)
    version = client.post(f"/models/upload/{model['id']}/ingest/", json={}, headers=headers)
    model_version = version.json()["version_id"]
    cyclic = workflow_definition(
        model_version,
        count={
            "kind": "model",
            "name": "count",
            "dependencies": ["publish"],
            "model_version": model_version,
        },
    )
    text = problem(client.post(upload, json={"definition": cyclic}, headers=headers), 400)
    assert "dependency cycle" in text
    dangling = workflow_definition(
        model_version, publish={"kind": "publisher", "name": "p", "dependencies": ["nowhere"]}
    )
    text = problem(client.post(upload, json={"definition": dangling}, headers=headers), 400)
    assert "unknown step(s) nowhere" in text
    loop = workflow_definition(
        model_version, publish={"kind": "loop", "name": "l", "dependencies": []}
    )
    assert "not supported" in problem(
        client.post(upload, json={"definition": loop}, headers=headers), 400
    )
    bad_model = {**MODEL, "spec": {"inputs": {"parameters": [{"name": "A B", "type": "x"}]}}}
    checked = client.put("/models/validate/", content=yaml.safe_dump(bad_model), headers=headers)
    assert checked.status_code == 200 and checked.json()["valid"] is False
    assert len(checked.json()["errors"]) == 2  # no command; bad parameter name
    parent = "/workflows/22222222-2222-2222-2222-222222222222/upload/"
    good = {"definition": workflow_definition(model_version)}
    assert "no workflow" in problem(client.post(parent, json=good, headers=headers), 404)
    assert counts(conn) == (before[0] + 1, *before[1:])  # only the model was added

    version_id = client.post(upload, json=good, headers=headers).json()["id"]
    ps_upload = "/workflows/parameter-set/upload/"
    for bad, reason in [
        (parameter_set(version_id, n="many"), "must be of type integer"),
        (parameter_set("33333333-3333-3333-3333-333333333333"), "no workflow"),
        ({**parameter_set(version_id), "spec": {"ghost": {}}}, "has no step 'ghost'"),
        ({**parameter_set(version_id), "kind": "W"}, "kind"),
    ]:
        assert reason in problem(client.post(ps_upload, json=bad, headers=headers), 400)
    validate = client.post(
        "/workflows/parameter-set/validate/", json=parameter_set(version_id), headers=headers
    )
    assert validate.status_code == 200 and validate.json() == {"valid": True}
    after = counts(conn)
    assert after[2] == before[2] and after[1] == before[1] + 1


def test_execution_requests_unknown_ids_repeats_and_deletes(client, conn) -> None:
    headers = bearer(client)
    model = client.post("/models/upload/", json={}, headers=headers).json()
    client.put(model["urls"]["definition"], content=yaml.safe_dump(MODEL), headers=headers)
    model_version = client.post(
        f"/models/upload/{model['id']}/ingest/", json={}, headers=headers
    ).json()["version_id"]
    version_id = client.post(
        "/workflows/upload/",
        headers=headers,
        json={"definition": workflow_definition(model_version)},
    ).json()["id"]
    ps_id = client.post(
        "/workflows/parameter-set/upload/", json=parameter_set(version_id), headers=headers
    ).json()["id"]
    nobody = "44444444-4444-4444-4444-444444444444"
    before = counts(conn)
    for path in (
        f"/workflows/execute/{nobody}/{ps_id}/",
        f"/workflows/execute/{version_id}/x/",
        f"/workflows/execute/{version_id}/{nobody}/",
    ):
        problem(client.post(path, headers=headers), 404)
    for path in (
        f"/workflows/{nobody}/",
        "/workflows/not-a-uuid/",
        f"/workflows/instances/{nobody}/",
        f"/models/{nobody}/",
    ):
        problem(client.get(path, headers=headers), 404)
    assert counts(conn) == before

    execute = f"/workflows/execute/{version_id}/{ps_id}/"
    keyed = {**headers, "Idempotency-Key": "run-1"}
    results: list[httpx2.Response] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.post(execute, headers=keyed)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 200, 200, 201]
    assert len({r.json()["instance_id"] for r in results}) == 1
    again = client.post(execute, headers=headers)
    assert again.status_code == 201
    assert counts(conn)[3:5] == (before[3] + 2, before[4] + 2)  # two instances, two workflows
    other = client.post(
        "/workflows/upload/",
        headers=headers,
        json={"definition": workflow_definition(model_version)},
    ).json()["id"]
    other_ps = client.post(
        "/workflows/parameter-set/upload/", json=parameter_set(other), headers=headers
    ).json()["id"]
    reused = client.post(f"/workflows/execute/{other}/{other_ps}/", headers=keyed)
    assert "Idempotency-Key" in problem(reused, 409)
    mismatched = client.post(f"/workflows/execute/{version_id}/{other_ps}/", headers=headers)
    problem(mismatched, 404)

    # Nothing runs these instances: the version cannot be deleted from under them.
    assert "still running" in problem(
        client.delete(f"/workflows/{version_id}/", headers=headers), 409
    )
    auth.add_user(conn, "bob", PASSWORD)
    form = {"grant_type": "password", "username": "bob", "password": PASSWORD}
    bob = {"Authorization": f"Bearer {client.post(TOKEN, data=form).json()['access_token']}"}
    assert client.get(f"/workflows/{version_id}/", headers=bob).json()["auth"]["destroy"] is False
    problem(client.delete(f"/workflows/{other}/", headers=bob), 403)
    assert client.delete(f"/workflows/{other}/", headers=headers).status_code == 204
    problem(client.get(f"/workflows/{other}/", headers=headers), 404)


def _signs_in(conn, name: str, password: str) -> bool:
    user, stored = auth.credentials(conn, name)
    return user is not None and auth.password_matches(password, stored)


def test_user_commands(dsn, conn) -> None:
    assert add_user(dsn).returncode == 0
    again = add_user(dsn)
    assert again.returncode == 2 and "already exists" in again.stderr
    short = add_user(dsn, "carol", "short")
    assert short.returncode == 2 and "at least 8" in short.stderr
    newline = add_user(dsn, "bad\nname")  # argv cannot carry a NUL: the API's test does
    assert newline.returncode == 2 and "control characters" in newline.stderr
    smifdb = [PY, "-m", "smifdb.cli", "--dsn", dsn, "api", "user"]
    listed = subprocess.run([*smifdb, "list", "--json"], capture_output=True, text=True)
    assert [(u["name"], u["role"]) for u in json.loads(listed.stdout)] == [("alice", "operator")]
    assert _signs_in(conn, "alice", PASSWORD)
    changed = subprocess.run(
        [*smifdb, "add", "alice", "--update", "--password-stdin"],
        input="a new password\n",
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 0, changed.stderr
    assert not _signs_in(conn, "alice", PASSWORD)
    assert _signs_in(conn, "alice", "a new password")
    removed = subprocess.run([*smifdb, "remove", "alice"], capture_output=True, text=True)
    assert removed.returncode == 0
    assert conn.execute("SELECT count(*) FROM api_tokens").fetchone()[0] == 0
    missing = subprocess.run([*smifdb, "remove", "alice"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no user 'alice'" in missing.stderr


def test_user_add_refuses_a_name_postgresql_cannot_store(dsn, conn) -> None:
    """A name that is not UTF-8 (argv cannot hold a NUL) reached PostgreSQL: a traceback."""
    undecodable = add_user(dsn, "al\udcffice")  # the byte 0xff, as Python decodes argv
    assert undecodable.returncode == 2, undecodable.stderr
    assert "a user name holds an unpaired surrogate" in undecodable.stderr
    assert "Traceback" not in undecodable.stderr
    assert conn.execute("SELECT count(*) FROM api_users").fetchone()[0] == 0


def register(client: TestClient, headers: dict, definition: dict) -> str:
    upload = client.post("/models/upload/", json={}, headers=headers).json()
    stored = client.put(
        upload["urls"]["definition"], content=yaml.safe_dump(definition), headers=headers
    )
    assert stored.status_code == 204, stored.text
    ingested = client.post(f"/models/upload/{upload['id']}/ingest/", json={}, headers=headers)
    return ingested.json()["version_id"]


@pytest.mark.parametrize(
    "spec,overall,steps",
    [
        ({"command": "exit 3"}, "Failed", ("Failed", "Omitted", "Omitted")),
        ({"command": "sleep 30", "timeout": 0.5}, "Error", ("Failed", "Omitted", "Omitted")),
    ],
)
def test_failed_and_errored_instances(client, procs, spec, overall, steps) -> None:
    headers = bearer(client)
    model_version = register(client, headers, {**MODEL, "spec": spec})
    version_id = client.post(
        "/workflows/upload/",
        headers=headers,
        json={"definition": workflow_definition(model_version)},
    ).json()["id"]
    ps = {**parameter_set(version_id), "spec": {}}
    ps_id = client.post("/workflows/parameter-set/upload/", json=ps, headers=headers).json()["id"]
    instance_id = client.post(f"/workflows/execute/{version_id}/{ps_id}/", headers=headers).json()[
        "instance_id"
    ]
    procs.start("--slots", "2", "--exit-when-idle", name="runner")

    def ended():
        raw = client.get(f"/workflows/instances/{instance_id}/", headers=headers).json()
        return raw if raw["finished_time"] else None

    raw = wait_for(ended, timeout=60, what="the instance to end")
    assert raw["overall_status"] == overall
    assert tuple(raw["step_status"][k]["status"] for k in ("count", "double", "publish")) == steps
    assert raw["produced_assets"] == {}
    instance = parse_workflow_instance(raw)
    assert instance.overall_status == overall


# -- bounded, storable input: never a 500, never a stall, nothing written --------------------


def as_alice(server: ApiServer) -> httpx2.Client:
    """A client of a real server with alice's token: the one place these tests sign in."""
    form = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    token = httpx2.post(f"{server.url}{TOKEN}", data=form).json()["access_token"]
    return httpx2.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


@contextlib.contextmanager
def answer_times(api: httpx2.Client) -> Iterator[list[float]]:
    """Another client asking GET /models/ all along: how long each answer took."""
    times: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert api.get("/models/").status_code == 200
            times.append(time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield times
    finally:
        stop.set()
        prober.join()


def _model_bomb() -> str:
    """A model definition whose summary is 9**9 strings through nine levels of aliases."""
    text = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    return text + yaml.safe_dump({**MODEL, "metadata": "BOMB"}).replace("BOMB", "*l8")


def test_a_yaml_alias_bomb_is_refused_at_once_and_the_server_keeps_answering(server, conn) -> None:
    """505 bytes of aliases held the event loop for 16 s and were stored as 73.7 MB of jsonb."""
    bomb = _model_bomb().encode()
    assert len(bomb) < 1000
    with as_alice(server) as api:
        upload = api.post("/models/upload/", json={}).json()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with answer_times(api) as times:
            for _ in range(5):
                started = time.monotonic()
                for path in ("/models/validate/", upload["urls"]["definition"]):
                    refused = api.put(path, content=bomb)
                    assert refused.status_code == 413, refused.text
                    assert "YAML aliases expand" in refused.json()["error_message"]
                assert time.monotonic() - started < 0.5
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        assert times and max(times) < 0.5, times
        assert grown < 50 * 2**20, grown
        ingest = api.post(f"/models/upload/{upload['id']}/ingest/", json={})
        assert "no definition" in ingest.json()["error_message"]
    assert conn.execute("SELECT count(*) FROM dafni_models").fetchone()[0] == 0
    stored = conn.execute("SELECT count(definition) FROM dafni_model_uploads").fetchone()[0]
    assert stored == 0


def test_large_definitions_never_hold_up_other_requests(server) -> None:
    """1 MB of plain YAML (8,000 parameters) held the event loop, and with it every other
    request, for seconds: YAML is read up to 128 kB, JSON up to the body limit, both parsed
    in a worker thread."""
    parameters = [
        {"name": f"P{i}", "type": "integer", "default": i, "description": "d" * 40}
        for i in range(8000)
    ]
    large = {**MODEL, "spec": {**MODEL["spec"], "inputs": {"parameters": parameters}}}
    small = {**MODEL, "spec": {**MODEL["spec"], "inputs": {"parameters": parameters[:900]}}}
    bodies = [(yaml.safe_dump(large), 413), (json.dumps(large), 200), (yaml.safe_dump(small), 200)]
    assert 900_000 < len(bodies[0][0]) < 1_000_000 and len(bodies[1][0]) > 900_000
    assert 100_000 < len(bodies[2][0]) < 128 * 1024
    with as_alice(server) as api:
        for body, status in bodies:
            with answer_times(api) as times:
                time.sleep(0.1)
                checked = api.put("/models/validate/", content=body, timeout=60)
                time.sleep(0.1)
            assert checked.status_code == status, checked.text[:300]
            assert len(times) > 3 and max(times) < 0.5, (len(body), status, times)
            if status == 413:
                assert "send a larger one as JSON" in checked.json()["error_message"]
            else:
                assert checked.json() == {"valid": True, "errors": []}


@pytest.fixture
def shim(client: TestClient) -> dict:
    """alice's headers, and a model, workflow and parameter set of hers to aim bad input at."""
    headers = bearer(client)
    model_version = register(client, headers, MODEL)
    workflow = {"definition": workflow_definition(model_version)}
    version_id = client.post("/workflows/upload/", json=workflow, headers=headers).json()["id"]
    ps = client.post(
        "/workflows/parameter-set/upload/", json=parameter_set(version_id), headers=headers
    )
    assert ps.status_code == 201, ps.text
    return {"headers": headers, "model": model_version, "workflow": version_id}


def _put_model(client: TestClient, shim: dict, text: str) -> httpx2.Response:
    upload = client.post("/models/upload/", json={}, headers=shim["headers"]).json()
    return client.put(upload["urls"]["definition"], content=text, headers=shim["headers"])


def _model_yaml(**spec) -> str:
    return yaml.safe_dump({**MODEL, "spec": {**MODEL["spec"], **spec}})


def _workflow(client: TestClient, shim: dict, **steps) -> httpx2.Response:
    definition = workflow_definition(shim["model"], **steps)
    return client.post(
        "/workflows/upload/", json={"definition": definition}, headers=shim["headers"]
    )


def _parameter_set(client: TestClient, shim: dict, **spec) -> httpx2.Response:
    definition = {**parameter_set(shim["workflow"]), "spec": spec}
    return client.post("/workflows/parameter-set/upload/", json=definition, headers=shim["headers"])


def _raw(client: TestClient, shim: dict, path: str, text: str) -> httpx2.Response:
    return client.post(path, content=text, headers=shim["headers"])


COUNT = {"kind": "model", "name": "count", "model_version": "MODEL"}
# Each was a 500 (or accepted, and a 500 on every later GET, or a wrong message) before.
BAD_INPUT = {
    "NaN in a workflow": (
        lambda c, s: _raw(
            c,
            s,
            "/workflows/upload/",
            json.dumps({"definition": workflow_definition(s["model"])}).replace(
                '"summary": "Two model steps and a publisher"', '"summary": NaN'
            ),
        ),
        "NaN is not JSON",
    ),
    "Infinity in a parameter set": (
        lambda c, s: _raw(
            c,
            s,
            "/workflows/parameter-set/upload/",
            json.dumps(parameter_set(s["workflow"])).replace('"description": ""', '"x": -Infinity'),
        ),
        "-Infinity is not JSON",
    ),
    "990 nested lists in a workflow": (
        lambda c, s: _raw(c, s, "/workflows/upload/", "[" * 990 + "]" * 990),
        "nested more than 64 levels deep",
    ),
    "990 nested lists in a model": (
        lambda c, s: _put_model(c, s, "[" * 990 + "]" * 990),
        "nested more than 64 levels deep",
    ),
    "a NaN timeout in a YAML model": (
        lambda c, s: _put_model(c, s, _model_yaml(timeout=float("nan"))),
        "spec.timeout: nan is not a JSON number",
    ),
    "an infinite default in a YAML model": (
        lambda c, s: _put_model(
            c,
            s,
            _model_yaml(
                inputs={"parameters": [{"name": "X", "type": "number", "default": -math.inf}]}
            ),
        ),
        "spec.inputs.parameters[0].default: -inf is not a JSON number",
    ),
    "a date in a YAML model": (
        lambda c, s: _put_model(
            c,
            s,
            _model_yaml(inputs={"dataslots": [{"name": "d", "when": datetime.date(2020, 1, 1)}]}),
        ),
        "a date is not a JSON value",
    ),
    "NUL in a model's summary": (
        lambda c, s: _put_model(
            c, s, json.dumps({**MODEL, "metadata": {**MODEL["metadata"], "summary": "a\0b"}})
        ),
        "metadata.summary: the string holds a NUL character",
    ),
    "NUL in a parameter set's dataslot": (
        lambda c, s: _parameter_set(
            c, s, count={"parameters": [], "dataslots": [{"path": "in\0puts/"}]}
        ),
        "spec.count.dataslots[0].path: the string holds a NUL character",
    ),
    "NUL in a step id": (
        lambda c, s: _workflow(c, s, **{"a\0": {**COUNT, "model_version": s["model"]}}),
        "spec.steps.a\ufffd (a key): the string holds a NUL character",
    ),
    "NUL in a workflow's version message": (
        lambda c, s: c.post(
            "/workflows/upload/",
            json={"definition": workflow_definition(s["model"]), "version_message": "v\0"},
            headers=s["headers"],
        ),
        "version_message holds a NUL character",
    ),
    "NUL in a model's version message": (
        lambda c, s: c.post(
            f"/models/upload/{_uploaded(c, s)}/ingest/",
            json={"version_message": "v\0"},
            headers=s["headers"],
        ),
        "version_message holds a NUL character",
    ),
    "NUL in a user name": (
        lambda c, s: c.post(
            TOKEN, data={"grant_type": "password", "username": "al\0ice", "password": PASSWORD}
        ),
        "a user name holds a NUL character",
    ),
    "a list for a step's values": (
        lambda c, s: _parameter_set(c, s, count=[{"name": "N", "value": 1}]),
        "spec.count: must be a mapping",
    ),
    "a number for a parameter": (
        lambda c, s: _parameter_set(c, s, count={"parameters": [5]}),
        "spec.count.parameters[0]: must be {name, value}",
    ),
    "a list for a parameter's name": (
        lambda c, s: _parameter_set(c, s, count={"parameters": [{"name": ["N"], "value": 1}]}),
        "spec.count.parameters[0]: must be {name, value}",
    ),
    "kind: [model] for a step": (
        lambda c, s: _workflow(
            c, s, count={**COUNT, "kind": ["model"], "model_version": s["model"]}
        ),
        "spec.steps.count.kind: must be one of",
    ),
    "type: [integer] for a model parameter": (
        lambda c, s: _put_model(
            c, s, _model_yaml(inputs={"parameters": [{"name": "X", "type": ["integer"]}]})
        ),
        "spec.inputs.parameters[0].type: must be one of",
    ),
    "a list for a model's outputs": (
        lambda c, s: _put_model(c, s, _model_yaml(outputs=["results"])),
        "spec.outputs: must be a mapping",
    ),
    "numbers for a model's dataslots": (
        lambda c, s: _put_model(c, s, _model_yaml(inputs={"parameters": [], "dataslots": [1]})),
        "spec.inputs.dataslots: must be a list of mappings",
    ),
    # uuid.UUID takes these; the model was found at upload and 'deleted' at every execution.
    "a braced model version id": (
        lambda c, s: _workflow(c, s, count={**COUNT, "model_version": "{" + s["model"] + "}"}),
        "spec.steps.count.model_version: a model version id is required",
    ),
    "an upper-case model version id": (
        lambda c, s: _workflow(c, s, count={**COUNT, "model_version": s["model"].upper()}),
        "spec.steps.count.model_version: a model version id is required",
    ),
    "a path for a step id": (
        lambda c, s: _workflow(
            c, s, **{"../../victim/file.txt": {**COUNT, "model_version": s["model"]}}
        ),
        "the step id '../../victim/file.txt' must be 1 to 128 letters",
    ),
    "'..' for a step id": (
        lambda c, s: _workflow(c, s, **{"..": {**COUNT, "model_version": s["model"]}}),
        "the step id '..' must be",
    ),
}


def _uploaded(client: TestClient, shim: dict) -> str:
    upload = client.post("/models/upload/", json={}, headers=shim["headers"]).json()
    stored = client.put(
        upload["urls"]["definition"], content=yaml.safe_dump(MODEL), headers=shim["headers"]
    )
    assert stored.status_code == 204
    return upload["id"]


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_a_400_naming_it_and_nothing_is_written(client, shim, conn, case) -> None:
    send, reason = BAD_INPUT[case]
    before = counts(conn)
    response = send(client, shim)
    assert response.status_code == 400, response.text
    body = response.json()
    text = " ".join(
        [body.get("error_message", body.get("error_description", "")), *body.get("errors", [])]
    )
    assert reason in text, text
    assert counts(conn) == before
    stored = "SELECT count(*) FROM dafni_model_uploads WHERE definition IS NOT NULL"
    assert conn.execute(stored).fetchone()[0] == (1 if "model's version" in case else 0)
    for path in ("/models/", "/workflows/", f"/workflows/{shim['workflow']}/"):
        assert client.get(path, headers=shim["headers"]).status_code == 200


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_step_ids_are_safe_names_and_no_step_writes_outside_its_folder(
    client, conn, procs, tmp_path
) -> None:
    """A step id "../../victim/file.txt" made `mkdir -p`, the step's command and `ln -sfn`
    act outside the step's folder. Refused at upload; a definition stored before the rule is
    refused at execution; real runs of safe ids (dots and dashes too) stay inside."""
    headers = bearer(client)
    model_version = register(client, headers, MODEL)
    victim = tmp_path / "victim" / "file.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    evil = "../../victim/file.txt"
    steps = {
        "count": {"kind": "model", "name": "count", "model_version": model_version},
        evil: {
            "kind": "model",
            "name": "evil",
            "dependencies": ["count"],
            "inputs": ["count"],
            "model_version": model_version,
        },
    }
    definition = {**workflow_definition(model_version), "spec": {"steps": steps}}
    refused = client.post("/workflows/upload/", json={"definition": definition}, headers=headers)
    assert f"the step id {evil!r} must be 1 to 128 letters" in problem(refused, 400)

    # As if stored before the rule: written straight to the table, then executed.
    alice = auth.credentials(conn, "alice")[0]
    stored = rows.add_workflow(conn, definition, owner=alice, message="old")
    ps = {**parameter_set(str(stored)), "spec": {}}
    ps_id = rows.add_parameter_set(conn, stored, ps, owner=alice)
    before, outside = counts(conn), _files(tmp_path)
    executed = client.post(f"/workflows/execute/{stored}/{ps_id}/", headers=headers)
    assert f"step id {evil!r} is not a safe folder name" in problem(executed, 400)
    assert counts(conn) == before

    safe = {
        "count": steps["count"],
        "double.v-2": {**steps[evil], "name": "double"},
        "publish": {
            "kind": "publisher",
            "name": "publish",
            "dependencies": ["double.v-2"],
            "inputs": ["double.v-2"],
        },
    }
    good = {**workflow_definition(model_version), "spec": {"steps": safe}}
    version = client.post("/workflows/upload/", json={"definition": good}, headers=headers)
    assert version.status_code == 201, version.text
    good_ps = {**parameter_set(version.json()["id"]), "spec": {}}
    ps_id = client.post("/workflows/parameter-set/upload/", json=good_ps, headers=headers)
    run = f"/workflows/execute/{version.json()['id']}/{ps_id.json()['id']}/"
    instance_id = client.post(run, headers=headers).json()["instance_id"]
    procs.start("--slots", "2", "--exit-when-idle", name="runner").wait(60)
    raw = client.get(f"/workflows/instances/{instance_id}/", headers=headers).json()
    assert raw["overall_status"] == "Succeeded", raw
    files = f"/workflows/instances/{instance_id}/steps/double.v-2/outputs/"
    listed = client.get(files, headers=headers).json()["files"]
    assert [f["path"] for f in listed] == ["outputs/n.txt"]
    assert client.get(listed[0]["url"], headers=headers).content == b"2\n"
    assert victim.read_text() == "precious" and not victim.is_symlink()
    written = _files(tmp_path) - outside
    assert all("logs" in p.parts or p.name.endswith(".log") for p in written), written


def _run_instance(client, headers, procs, steps: dict) -> tuple[str, dict]:
    model_version = register(client, headers, MODEL)
    steps = {
        k: {**v, "model_version": model_version} if v["kind"] == "model" else v
        for k, v in steps.items()
    }
    definition = {**workflow_definition(model_version), "spec": {"steps": steps}}
    version = client.post("/workflows/upload/", json={"definition": definition}, headers=headers)
    assert version.status_code == 201, version.text
    ps = {**parameter_set(version.json()["id"]), "spec": {}}
    ps_id = client.post("/workflows/parameter-set/upload/", json=ps, headers=headers).json()["id"]
    run = client.post(f"/workflows/execute/{version.json()['id']}/{ps_id}/", headers=headers)
    assert run.status_code == 201, run.text
    instance_id = run.json()["instance_id"]
    procs.start("--slots", "2", "--exit-when-idle", name="runner").wait(60)
    raw = client.get(f"/workflows/instances/{instance_id}/", headers=headers).json()
    assert raw["overall_status"] == "Succeeded", raw
    return instance_id, raw


def test_step_outputs_are_paged_streamed_and_guarded(client, procs) -> None:
    """Step outputs and a produced asset's files: keyset pages with a Link, each file an
    attachment with its sha256 as ETag; unknown steps, paths and cursors are JSON 4xx."""
    headers = bearer(client)
    step = {"kind": "model", "name": "count", "dependencies": []}
    steps = {
        "a": step,
        "b": step,
        "publish": {
            "kind": "publisher",
            "name": "p",
            "dependencies": ["a", "b"],
            "inputs": ["a", "b"],
        },
    }
    instance_id, raw = _run_instance(client, headers, procs, steps)
    base = f"/workflows/instances/{instance_id}"
    produced = raw["produced_assets"]["publish"]["files_url"]
    assert produced.endswith(f"{base}/produced/publish/")
    first = client.get(f"{base}/produced/publish/?limit=1", headers=headers)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [(f["step_id"], f["path"]) for f in page["files"]] == [("a", "outputs/n.txt")]
    assert page["next"] and 'rel="next"' in first.headers["link"]
    second = client.get(
        f"{base}/produced/publish/?limit=1&cursor={page['next']}", headers=headers
    ).json()
    assert [(f["step_id"], f["path"]) for f in second["files"]] == [("b", "outputs/n.txt")]
    assert second["next"] is None

    url = page["files"][0]["url"]
    got = client.get(url, headers=headers)
    assert got.status_code == 200 and got.content == b"1\n"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-length"] == "2"
    etag = got.headers["etag"]
    assert client.get(url, headers={**headers, "If-None-Match": etag}).status_code == 304

    # A cursor that is none, unknown steps and paths, a step that produces nothing, no token.
    other = client.get(f"{base}/steps/a/outputs/?cursor=bm90LWEtY3Vyc29y", headers=headers)
    assert "bad cursor" in problem(other, 400)
    assert "limit must be" in problem(
        client.get(f"{base}/steps/a/outputs/?limit=0", headers=headers), 400
    )
    assert "has no step 'zz'" in problem(
        client.get(f"{base}/steps/zz/outputs/", headers=headers), 404
    )
    for path in ("outputs/none.txt", "outputs/%2e%2e/outputs/n.txt", "%2e%2e/x"):
        assert "has no output" in problem(
            client.get(f"{base}/steps/a/outputs/{path}", headers=headers), 404
        )
    assert "produces no asset" in problem(client.get(f"{base}/produced/a/", headers=headers), 404)
    gone = "/workflows/instances/00000000-0000-4000-8000-000000000000/steps/a/outputs/"
    assert "no workflow instance" in problem(client.get(gone, headers=headers), 404)
    assert client.get(url).status_code == 401


def test_an_input_step_cannot_take_a_step_folder_name(client, conn, procs) -> None:
    """An input step named 'outputs' would land in the reading step's own outputs/."""
    headers = bearer(client)
    model_version = register(client, headers, MODEL)
    steps = {
        "outputs": {"kind": "model", "name": "o", "model_version": model_version},
        "reader": {
            "kind": "model",
            "name": "r",
            "dependencies": ["outputs"],
            "inputs": ["outputs"],
            "model_version": model_version,
        },
    }
    definition = {**workflow_definition(model_version), "spec": {"steps": steps}}
    version = client.post("/workflows/upload/", json={"definition": definition}, headers=headers)
    assert version.status_code == 201, version.text
    ps = {**parameter_set(version.json()["id"]), "spec": {}}
    ps_id = client.post("/workflows/parameter-set/upload/", json=ps, headers=headers).json()["id"]
    before = counts(conn)
    run = client.post(f"/workflows/execute/{version.json()['id']}/{ps_id}/", headers=headers)
    assert "cannot be another step's input" in problem(run, 400)
    assert counts(conn) == before
