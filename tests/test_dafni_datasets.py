"""The DAFNI data catalogue against dafni-cli's real `dafni` command: every dataset command,
run in its own process with only its URLs rebound, on a real server and database; and a
workflow whose parameter set fills a step's dataslot with a dataset the step reads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import credentials
import pytest
from processes import ApiServer, wait_for
from test_dafni import (  # noqa: F401 - fixtures
    MODEL,
    PASSWORD,
    bearer,
    client,
    parameter_set,
    problem,
    server,
    workflow_definition,
)

pytest.importorskip("dafni_cli", reason="dafni-cli is in the test extra")

WRAPPER = """\
import sys
import dafni_cli.consts as c, dafni_cli.api.session as s
import dafni_cli.api.workflows_api as w, dafni_cli.api.models_api as m
import dafni_cli.api.datasets_api as d, dafni_cli.api.minio_api as o
base = sys.argv.pop(1)
for mod in (c, w, m):
    mod.NIMS_API_URL = base
for mod in (c, d, o):
    mod.NID_API_URL = base
for mod in (c, d):
    mod.SEARCH_AND_DISCOVERY_API_URL = base
for mod in (c, o):
    mod.DSS_API_URL = base
token = base + '/realms/Production/protocol/openid-connect/token/'
for mod in (c, s):
    mod.LOGIN_API_ENDPOINT = token
    mod.LOGOUT_API_ENDPOINT = token.replace('token/', 'logout')
from dafni_cli.dafni import dafni
dafni()
"""
Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli(server: ApiServer, tmp_path: Path) -> Cli:  # noqa: F811
    """The `dafni` command with its NIMS, NID, search and DSS URLs rebound to the server."""
    wrapper = tmp_path / "dafni_local.py"
    wrapper.write_text(WRAPPER)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "DAFNI_USERNAME": "alice",
        "DAFNI_PASSWORD": PASSWORD,
        "PATH": "/usr/bin:/bin",
        "NO_PROXY": "127.0.0.1",
    }

    def run(*args: str, stdin: str = "", ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, str(wrapper), server.url, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if ok:
            assert done.returncode == 0, f"dafni {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    return run


def _ids(out: str) -> dict[str, str]:
    """The ids dafni-cli prints after an upload."""
    return {
        key: out.split(f"{key}:")[1].split()[0]
        for key in ("Dataset ID", "Version ID", "Metadata ID")
        if f"{key}:" in out
    }


def _metadata(cli: Cli, path: Path, title: str, *extra: str) -> Path:
    """`dafni create dataset-metadata`: the file a user writes before an upload."""
    cli(
        "create",
        "dataset-metadata",
        str(path),
        "--title",
        title,
        "--description",
        f"{title}, for tests",
        "--subject",
        "Transportation",
        "--language",
        "en",
        "--keyword",
        "traffic",
        "--organisation",
        "Tests Ltd",
        "https://example.org",
        "--contact",
        "Alice",
        "alice@example.org",
        "--license",
        "https://creativecommons.org/licenses/by/4.0/",
        "--version-message",
        "first",
        *extra,
    )
    return path


def test_every_dataset_command(cli, tmp_path) -> None:
    counts = _metadata(
        cli,
        tmp_path / "counts.json",
        "Traffic counts",
        "--start-date",
        "2020-01-01",
        "--end-date",
        "2020-12-31",
    )
    assert json.loads(counts.read_text())["dct:title"] == "Traffic counts"
    bare = counts
    checked = cli("validate", "dataset-metadata", str(bare), "-y")
    assert "Metadata validation successful" in checked.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(bare.read_text()), "dct:subject": "Cheese"}))
    refused = cli("validate", "dataset-metadata", str(bad), "-y", ok=False)
    assert refused.returncode == 1 and "dct:subject: must be one of" in refused.stdout

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "counts.csv").write_text("road,count\nA1,10\n")
    (data / "sub" / "notes.txt").write_bytes(b"\x00\x01 binary too")
    uploaded = cli("upload", "dataset", str(bare), str(data), "-y")
    first = _ids(uploaded.stdout)
    assert "Upload successful" in uploaded.stdout and len(first) == 3, uploaded.stdout

    listed = cli("get", "datasets")
    assert "Traffic counts" in listed.stdout and first["Dataset ID"] in listed.stdout
    assert first["Version ID"] in cli("get", "datasets", "--search", "TRAFFIC counts").stdout
    assert "Traffic counts" not in cli("get", "datasets", "--search", "rainfall").stdout
    inside = cli("get", "datasets", "--start-date", "2020-06-01", "--end-date", "2021-01-01")
    assert "Traffic counts" in inside.stdout
    outside = cli("get", "datasets", "--start-date", "2021-01-01")
    assert "Traffic counts" not in outside.stdout
    raw = json.loads(cli("get", "datasets", "--json").stdout)
    assert [d["id"]["dataset_uuid"] for d in raw["metadata"]] == [first["Dataset ID"]]

    shown = cli("get", "dataset", first["Version ID"], "--long")
    assert "Traffic counts" in shown.stdout and "data/counts.csv" in shown.stdout
    assert "data/sub/notes.txt" in shown.stdout and "Tests Ltd" in shown.stdout
    record = json.loads(cli("get", "dataset", first["Version ID"], "--json").stdout)
    assert record["parent"] == first["Dataset ID"] and record["auth"]["destroy"] is True
    assert {f["dcat:mediaType"] for f in record["metadata"]["dcat:distribution"]} == {
        "text/csv",
        "text/plain",
    }

    out = tmp_path / "out"
    out.mkdir()
    cli("download", "dataset", first["Version ID"], "--directory", str(out))
    assert (out / "data" / "counts.csv").read_text() == "road,count\nA1,10\n"
    assert (out / "data" / "sub" / "notes.txt").read_bytes() == b"\x00\x01 binary too"
    only = tmp_path / "only"
    only.mkdir()
    cli("download", "dataset", first["Version ID"], "*.csv", "--directory", str(only))
    assert [p.name for p in only.rglob("*") if p.is_file()] == ["counts.csv"]

    more = tmp_path / "more.csv"
    more.write_text("road,count\nA2,20\n")
    second = _ids(
        cli(
            "upload",
            "dataset-version",
            first["Version ID"],
            str(more),
            "--version-message",
            "second",
            "-y",
        ).stdout
    )
    assert second["Dataset ID"] == first["Dataset ID"] != second["Version ID"]
    history = cli("get", "dataset", second["Version ID"], "--version-history").stdout
    assert first["Version ID"] in history and "second" in history and "latest" in history

    retitled = _ids(
        cli(
            "upload", "dataset-metadata", second["Version ID"], "--title", "Counts, v2", "-y"
        ).stdout
    )
    assert retitled["Version ID"] == second["Version ID"]
    assert retitled["Metadata ID"] != second["Metadata ID"]
    assert "Counts, v2" in cli("get", "dataset", second["Version ID"]).stdout
    saved = tmp_path / "saved.json"
    cli("upload", "dataset-metadata", second["Version ID"], "--save", str(saved))
    assert json.loads(saved.read_text())["dct:title"] == "Counts, v2"

    reference = _ids(
        cli("upload", "reference-dataset", str(bare), "https://example.org/x", "-y").stdout
    )
    ref_version = _ids(
        cli(
            "upload",
            "reference-dataset-version",
            reference["Version ID"],
            "https://example.org/y",
            "-y",
        ).stdout
    )
    assert ref_version["Dataset ID"] == reference["Dataset ID"]
    assert (
        "Reference URL: https://example.org/y"
        in cli("get", "dataset", ref_version["Version ID"]).stdout
    )

    deleted = cli("delete", "dataset-version", first["Version ID"], stdin="y\n")
    assert "Dataset versions deleted" in deleted.stdout
    gone = cli("get", "dataset", first["Version ID"], ok=False)
    assert gone.returncode == 1 and "Unable to find a dataset" in gone.stdout
    assert "Counts, v2" in cli("get", "dataset", second["Version ID"]).stdout

    assert "Datasets deleted" in cli("delete", "dataset", second["Version ID"], stdin="y\n").stdout
    assert cli("get", "dataset", second["Version ID"], ok=False).returncode == 1
    assert "Counts, v2" not in cli("get", "datasets").stdout


def test_a_dataslot_fills_the_steps_inputs(cli, server, tmp_path, procs) -> None:  # noqa: F811
    """A parameter set names a dataset version for a step's dataslot: the step, on a runner
    with only the store between them, reads the dataset's files under inputs/<path>."""
    bare = _metadata(cli, tmp_path / "m.json", "Greeting")
    data = tmp_path / "greeting"
    (data / "deep").mkdir(parents=True)
    (data / "hello.txt").write_text("hello from the catalogue\n")
    (data / "deep" / "n.txt").write_text("7\n")
    version_id = _ids(cli("upload", "dataset", str(bare), str(data), "-y").stdout)["Version ID"]

    import httpx2

    form = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    token = httpx2.post(f"{server.url}/realms/x/protocol/openid-connect/token/", data=form)
    api = httpx2.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        timeout=20,
    )
    model = {
        **MODEL,
        "spec": {
            "command": "cat inputs/data/greeting/hello.txt inputs/data/greeting/deep/n.txt"
            " > outputs/read.txt; ls inputs > outputs/inputs.txt",
            "inputs": {
                "parameters": [],
                "dataslots": [{"name": "data", "path": "inputs/data/", "required": True}],
            },
        },
    }
    upload = api.post("/models/upload/", json={}).json()
    assert api.put(upload["urls"]["definition"], content=json.dumps(model)).status_code == 204
    model_version = api.post(f"/models/upload/{upload['id']}/ingest/", json={}).json()["version_id"]
    definition = workflow_definition(model_version)
    del definition["spec"]["steps"]["double"], definition["spec"]["steps"]["publish"]
    workflow = api.post("/workflows/upload/", json={"definition": definition}).json()["id"]
    ps = parameter_set(workflow)
    ps["spec"] = {
        "count": {
            "kind": "model",
            "parameters": [],
            "dataslots": [{"name": "data", "datasets": [version_id]}],
        }
    }
    made = api.post("/workflows/parameter-set/upload/", json=ps)
    assert made.status_code == 201, made.text
    shown = cli("get", "workflow-parameter-set", workflow, made.json()["id"])
    assert version_id in shown.stdout
    run = api.post(f"/workflows/execute/{workflow}/{made.json()['id']}/")
    assert run.status_code == 201, run.text
    instance = run.json()["instance_id"]
    procs.start("--slots", "1", name="runner")

    def ended():
        raw = api.get(f"/workflows/instances/{instance}/").json()
        return raw if raw["finished_time"] else None

    raw = wait_for(ended, timeout=60, what="the instance to end")
    assert raw["overall_status"] == "Succeeded", raw
    files = api.get(f"/workflows/instances/{instance}/steps/count/outputs/").json()["files"]
    got = {f["path"]: api.get(f["url"]).content for f in files}
    assert got["outputs/read.txt"] == b"hello from the catalogue\n7\n"
    assert got["outputs/inputs.txt"] == b"data\n"

    # The instance keeps its data: deleting the dataset afterwards leaves its record whole.
    assert cli("delete", "dataset", version_id, stdin="y\n").returncode == 0
    rerun = api.post(f"/workflows/execute/{workflow}/{made.json()['id']}/")
    assert problem(rerun, 404).startswith(f"no dataset version(s) {version_id}")


def test_bad_input_is_a_4xx_never_a_500(client, dsn) -> None:  # noqa: F811
    headers = bearer(client)
    assert "dct:title" in problem(
        client.post("/nid/validate/", json={"metadata": {}}, headers=headers), 400
    )
    assert problem(client.post("/nid/validate/", json=[1], headers=headers), 400)
    assert problem(client.get("/nid/metadata/not-an-id", headers=headers), 404)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert problem(client.get(f"/nid/metadata/{unknown}", headers=headers), 404)
    assert problem(client.delete(f"/nid/dataset/{unknown}", headers=headers), 404)
    assert problem(client.delete(f"/nid/version/{unknown}/", headers=headers), 404)
    assert problem(client.get(f"/nid/download/{unknown}/a.csv", headers=headers), 404)
    offset = {"offset": {"start": "zero", "size": 1}}
    assert "offset.start" in problem(client.post("/catalogue/", json=offset, headers=headers), 400)
    dates = {"date_range": {"begin": "last tuesday"}}
    assert problem(client.post("/catalogue/", json=dates, headers=headers), 400)

    bucket = client.post("/nid/upload/", headers=headers).json()
    assert bucket.startswith("temp-")
    escape = {"bucketId": bucket, "datafiles": ["../../etc/passwd"]}
    assert "'..'" in problem(client.patch("/nid/upload/", json=escape, headers=headers), 400)
    urls = client.patch(
        "/nid/upload/", json={"bucketId": bucket, "datafiles": ["a.csv"]}, headers=headers
    )
    assert urls.status_code == 200, urls.text
    assert (
        client.put(urls.json()["urls"]["a.csv"], content=b"x,y\n", headers=headers).status_code
        == 204
    )
    no_metadata = client.post("/nid/dataset/", json={"bucketId": bucket}, headers=headers)
    assert problem(no_metadata, 400)
    ref = {"reference": "file:///etc/passwd", "metadata": {}}
    assert problem(client.post("/nid/dataset-reference/", json=ref, headers=headers), 400)
    assert (
        client.delete(f"/assets/{bucket.removeprefix('temp-')}", headers=headers).status_code == 204
    )
    assert problem(client.put(urls.json()["urls"]["a.csv"], content=b"x", headers=headers), 404)

    # A viewer reads the catalogue's records but changes nothing.
    viewer = credentials.bearer(credentials.user_token(dsn, "vera", role="viewer"))
    assert problem(client.post("/nid/upload/", headers=viewer), 403)
    assert problem(client.delete(f"/nid/dataset/{unknown}", headers=viewer), 403)
    assert problem(client.get(f"/nid/metadata/{unknown}", headers=viewer), 404)
    # ...and may search it and check metadata: those POSTs only read.
    searched = client.post("/catalogue/", headers=viewer, json={"offset": {"start": 0, "size": 5}})
    assert searched.status_code == 200, searched.text
