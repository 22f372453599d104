"""The HTTP API on a real database: smif-app model-run endpoints, workflows, jobs, runners,
and bad input answered with JSON 4xx errors (never a 500)."""

from __future__ import annotations

from collections.abc import Iterator

import credentials
import httpx2
import pytest
from credentials import bearer, user_token
from processes import cli, free_port, submit_loop_model_run, wait_for
from starlette.testclient import TestClient

from smifdb.api import create_app


@pytest.fixture
def client(dsn: str) -> Iterator[TestClient]:
    with credentials.client(create_app(dsn, max_body=10_000), user_token(dsn)) as c:
        yield c


def data(response: httpx2.Response, status: int = 200):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == {}
    return body["data"]


def error(response: httpx2.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["data"] is None and body["error"]["code"] == status
    return body["error"]["message"]


DAG = {
    "name": "api",
    "jobs": [
        {"key": "a", "python": "smifdb.examples:converge", "args": {"value": 0}},
        {"key": "b", "python": "smifdb.examples:noop", "after": ["a"]},
    ],
}


def test_submit_run_and_inspect_a_workflow(client, procs) -> None:
    workflow_id = data(client.post("/api/v1/workflows/", json=DAG), 201)["id"]
    assert data(client.get(f"/api/v1/workflows/{workflow_id}"))["job_count"] == 2
    jobs = data(client.get(f"/api/v1/workflows/{workflow_id}/jobs"))
    by_key = {j["key"]: j for j in jobs}
    assert by_key["b"]["parents"] == [by_key["a"]["id"]]
    assert {j["status"] for j in jobs} == {"ready", "waiting"}
    procs.start("--slots", "2", "--exit-when-idle", name="runner")
    wait_for(
        lambda: data(client.get(f"/api/v1/workflows/{workflow_id}"))["status"] == "succeeded",
        what="workflow to succeed",
    )
    job = data(client.get(f"/api/v1/jobs/{by_key['a']['id']}"))
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["runner"] == "runner"
    assert [e["to_status"] for e in job["events"]] == ["ready", "running", "succeeded"]
    result = data(client.get(f"/api/v1/jobs/{by_key['a']['id']}/result"))
    assert result == {"status": "succeeded", "result": {"value": 0.5, "change": 0.5}}
    runners = data(client.get("/api/v1/runners/"))
    assert [r["name"] for r in runners] == ["runner"]
    listed = data(client.get("/api/v1/workflows/?status=succeeded"))
    assert [w["id"] for w in listed] == [workflow_id]


def test_bad_input_gets_json_4xx_and_writes_nothing(client, conn) -> None:
    before = conn.execute("SELECT count(*) FROM workflows").fetchone()
    post = client.post
    headers = {"content-type": "application/json"}
    assert "malformed JSON" in error(post("/api/v1/workflows/", content=b"{", headers=headers), 400)
    assert "required" in error(post("/api/v1/workflows/", content=b""), 400)
    assert "must be a mapping" in error(post("/api/v1/workflows/", json=[1, 2]), 400)
    cycle = {
        "jobs": [
            {"key": "a", "command": "true", "after": ["b"]},
            {"key": "b", "command": "true", "after": ["a"]},
        ]
    }
    assert "dependency cycle" in error(post("/api/v1/workflows/", json=cycle), 400)
    big = {"jobs": [{"key": "x" * 20_000, "command": "true"}]}
    assert "over 10000 bytes" in error(post("/api/v1/workflows/", json=big), 413)
    assert conn.execute("SELECT count(*) FROM workflows").fetchone() == before
    for path in (
        "/api/v1/workflows/999999",
        "/api/v1/workflows/999999/jobs",
        "/api/v1/jobs/999999",
        "/api/v1/jobs/99999999999999999999999",
        "/api/v1/workflows/abc",
        "/api/v1/nowhere",
        "/api/v1/model_runs/never_started",
    ):
        error(client.get(path), 404)
    error(post("/api/v1/workflows/999999/cancel"), 404)
    error(client.delete("/api/v1/workflows/"), 405)
    assert "unknown status" in error(client.get("/api/v1/model_runs/?status=bogus"), 400)
    assert "serves no smif project" in error(
        post("/api/v1/model_runs/x/start", json={"args": {}}), 400
    )
    status = data(client.get("/api/v1/model_runs/never_started/status"))
    assert status == {"status": "unstarted"}


def test_smif_app_api_starts_watches_and_kills_a_model_run(dsn, tmp_path, procs) -> None:
    """Through a real `smifdb api serve`: start a generic model run, watch it, kill another."""
    project = tmp_path / "project"
    project.mkdir()
    port = free_port()
    server = procs.spawn(
        "api", "serve", "--port", str(port), "--project", str(project), log_name="api"
    )
    # As a user would: a user and a token from the CLI, then the token on every request.
    assert cli(dsn, "api", "user", "add", "ops", "--no-password").returncode == 0
    created = cli(dsn, "api", "token", "create", "--user", "ops", "--name", "test")
    assert created.returncode == 0, created.stderr
    http = httpx2.Client(
        base_url=f"http://127.0.0.1:{port}", headers=bearer(created.stdout.strip())
    )

    def up() -> bool:
        try:
            return http.get("/api/v1/runners/").status_code == 200
        except httpx2.HTTPError:
            return False

    wait_for(up, what="the API to listen")
    assert httpx2.get(f"http://127.0.0.1:{port}/api/v1/runners/").status_code == 401
    # The smif app API starts smif model runs of its project; without smif configuration the
    # model run is unknown: a clear 400/404, nothing started.
    response = http.post("/api/v1/model_runs/energy_central/start", json={"args": {}})
    assert response.status_code in (400, 404)
    assert response.json()["error"]["message"]
    bad = http.post("/api/v1/model_runs/x/start", json={"args": {"warm_start": "yes"}})
    assert bad.status_code == 400 and "warm_start" in bad.json()["error"]["message"]
    # A model run submitted elsewhere is watched and killed through the same endpoints (by
    # an admin: a model run submitted with database credentials belongs to no API user).
    submitted = submit_loop_model_run(dsn, project)
    assert submitted.stdout.strip()
    status = http.get("/api/v1/model_runs/loop/status").json()["data"]
    assert status["status"] == "running" and status["bundles"] == 1
    assert http.post("/api/v1/model_runs/loop/kill").status_code == 403
    assert cli(dsn, "api", "user", "set-role", "ops", "admin").returncode == 0
    assert http.post("/api/v1/model_runs/loop/kill").status_code == 401  # tokens revoked
    created = cli(dsn, "api", "token", "create", "--user", "ops")
    http.headers.update(bearer(created.stdout.strip()))
    killed = http.post("/api/v1/model_runs/loop/kill").json()["data"]
    assert killed["status"] == "stopped" and killed["bundles_cancelled"] == 1
    assert http.get("/api/v1/model_runs/loop/status").json()["data"]["status"] == "stopped"
    again = http.post("/api/v1/model_runs/loop/kill")
    assert again.status_code == 409
    listed = http.get("/api/v1/model_runs/?status=stopped").json()["data"]
    assert [r["name"] for r in listed] == ["loop"]
    server.terminate()
    server.wait(10)
