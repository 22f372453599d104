"""Secure by default (docs/security.md), proved the way users are separated: another user is
another API user with another role, a web page is a request with a foreign Origin or Host or a
text/plain body, and every check runs against the real app on a real database."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import credentials
import httpx2
import psycopg
import pytest
from credentials import PASSWORD, bearer, user_token
from processes import ApiServer, cli, free_port, wait_for
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from smifdb.api import create_app
from smifdb.api.security import PUBLIC, READING_POSTS, RUNNER_TOKEN_TTL, SESSION_COOKIE
from smifdb.api.session import MAX_WAITING_SIGN_INS
from smifdb.spec import parse
from smifdb.store import auth
from smifdb.store.submit import submit_dag

DAG = {"name": "web", "jobs": [{"key": "a", "command": "touch /tmp/smifdb-pwned"}]}
TABLES = (
    "workflows",
    "jobs",
    "events",
    "model_runs",
    "api_tokens",
    "dafni_models",
    "dafni_model_uploads",
    "dafni_workflows",
    "dafni_parameter_sets",
    "dafni_instances",
)


@pytest.fixture
def app(dsn: str, tmp_path: Path):
    return create_app(dsn)


@pytest.fixture
def anonymous(app) -> Iterator[TestClient]:
    with credentials.client(app) as c:
        yield c


def snapshot(conn: psycopg.Connection) -> dict:
    counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    counts["statuses"] = conn.execute(
        "SELECT array_agg(status::text ORDER BY id) FROM jobs"
    ).fetchone()[0]
    return counts


def a_workflow(conn: psycopg.Connection, submitted_by: int | None = None) -> tuple[int, int]:
    """A workflow with one ready job: (workflow id, job id)."""
    workflow_id = submit_dag(conn, parse(DAG), actor="test", submitted_by=submitted_by)
    job_id = conn.execute("SELECT id FROM jobs WHERE workflow_id = %s", [workflow_id]).fetchone()[0]
    return workflow_id, job_id


def user_id(conn: psycopg.Connection, name: str) -> int:
    return conn.execute("SELECT id FROM api_users WHERE name = %s", [name]).fetchone()[0]


def concrete(path: str, workflow_id: int, job_id: int) -> str:
    """A route's path with real ids in it: a guard that let one through would change them."""
    values = {"workflow_id": workflow_id, "job_id": job_id, "name": "loop", "realm": "Production"}
    return re.sub(
        r"\{(\w+)(?::\w+)?\}",
        lambda m: str(values.get(m.group(1), uuid.uuid4())),
        path,
    )


def test_every_route_outside_the_public_list_answers_401_and_changes_nothing(
    app, anonymous, conn
) -> None:
    """From the route table: a route added later is covered without touching this test."""
    workflow_id, job_id = a_workflow(conn)
    before = snapshot(conn)
    checked = 0
    for route in app.routes:
        if isinstance(route, Mount):
            paths, methods = [f"{route.path}/dashboard.js"], {"GET"}
        else:
            assert isinstance(route, Route)
            paths, methods = [concrete(route.path, workflow_id, job_id)], route.methods or set()
        for path in paths:
            for method in methods - {"HEAD"}:
                public = any(m.__contains__(method) and p.fullmatch(path) for m, p in PUBLIC)
                if public or path == "/metrics":
                    continue
                response = anonymous.request(method, path, json=DAG)
                where = f"{method} {path}"
                assert response.status_code == 401, (where, response.status_code, response.text)
                assert response.headers["content-type"].startswith("application/json"), where
                assert response.headers["www-authenticate"].startswith("Bearer"), where
                checked += 1
    assert checked >= 30
    assert snapshot(conn) == before
    # The public list is exactly signing in and describing the API.
    assert anonymous.get("/login").status_code == 200
    assert anonymous.get("/static/login.css").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200
    assert anonymous.get("/metrics").status_code == 200
    assert anonymous.get("/static/dashboard.js").status_code == 401
    # A browser that is not signed in is sent to the login page, and back afterwards.
    page = anonymous.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/"


def test_a_bad_or_malformed_credential_is_401_before_anything_runs(anonymous, conn) -> None:
    before = snapshot(conn)
    for headers in (
        {"Authorization": "Bearer nonsense"},
        {"Authorization": "Basic YWxpY2U6cGFzc3dvcmQ="},
        {"Authorization": "Bearer"},
        {"Cookie": f"{SESSION_COOKIE}=nonsense"},
    ):
        response = anonymous.post("/api/v1/workflows/", json=DAG, headers=headers)
        assert response.status_code == 401, (headers, response.text)
    assert snapshot(conn) == before


def sign_in(client: TestClient, name: str, password: str = PASSWORD, **headers) -> httpx2.Response:
    return client.post(
        "/login?next=/",
        data={"name": name, "password": password},
        headers=headers,
        follow_redirects=False,
    )


def test_cross_site_requests_are_refused_and_nothing_is_written(app, dsn, conn) -> None:
    token = user_token(dsn, "alice", role="operator")
    with credentials.client(app) as browser, credentials.client(app, token) as script:
        signed_in = sign_in(browser, "alice", origin="http://localhost")
        assert signed_in.status_code == 303, signed_in.text
        before = snapshot(conn)
        form = {"content-type": "text/plain"}
        text = b'{"name": "web", "jobs": [{"key": "a", "command": "touch /tmp/pwned"}]}'
        # A cross-site <form enctype="text/plain">: the cookie goes with it, Origin betrays it.
        forged = browser.post(
            "/api/v1/workflows/", content=text, headers={**form, "origin": "http://evil.example"}
        )
        assert forged.status_code == 403 and "cross-origin" in forged.text
        # A browser that sends no Origin says cross-site in Sec-Fetch-Site; a request that sends
        # neither carries no proof that the page is ours: refused too.
        for site in ({"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}, {}):
            refused = browser.post("/api/v1/workflows/", content=text, headers={**form, **site})
            assert refused.status_code == 403, site
        # A no-cors fetch from another page: no credentials at all.
        with credentials.client(create_app(dsn)) as page:
            no_cors = page.post(
                "/api/v1/workflows/",
                content=text,
                headers={**form, "origin": "http://evil.example"},
            )
            assert no_cors.status_code == 401
        # Even with a real token a body that should be JSON must say so.
        assert script.post("/api/v1/workflows/", content=text, headers=form).status_code == 415
        # DNS rebinding: a foreign Host with a valid token or cookie is refused outright.
        rebound = {"host": "evil.example:8000"}
        assert script.get("/api/v1/workflows/", headers=rebound).status_code == 400
        assert browser.get("/api/v1/workflows/", headers=rebound).status_code == 400
        refused = script.get("/api/v1/workflows/", headers=rebound).json()
        assert "--allowed-host" in refused["error"]["message"]
        # A foreign Origin with a valid cookie cannot cancel either.
        workflow_id, _ = a_workflow(conn, user_id(conn, "alice"))
        before = snapshot(conn)
        cancel = f"/api/v1/workflows/{workflow_id}/cancel"
        assert browser.post(cancel, headers={"origin": "http://evil.example"}).status_code == 403
        assert browser.post(cancel, headers={"origin": "null"}).status_code == 403
        assert snapshot(conn) == before
        # The same page's own requests work: same Origin, or Sec-Fetch-Site: same-origin.
        # A no-referrer page's POST says "Origin: null"; the browser's Sec-Fetch-Site decides.
        nulled = {"origin": "null", "sec-fetch-site": "same-origin"}
        assert browser.post(cancel, headers=nulled).status_code == 200
        own = browser.post(
            "/api/v1/workflows/", json=DAG, headers={"sec-fetch-site": "same-origin"}
        )
        assert own.status_code == 201, own.text
        # A forged sign-in from another site gets no session.
        sessions = conn.execute("SELECT count(*) FROM api_tokens WHERE kind = 'session'")
        sessions = sessions.fetchone()[0]
        assert sign_in(browser, "alice", origin="http://evil.example").status_code == 403
        count = "SELECT count(*) FROM api_tokens WHERE kind = 'session'"
        assert conn.execute(count).fetchone()[0] == sessions


def test_roles_and_ownership(app, dsn, conn) -> None:
    tokens = {
        "viewer": user_token(dsn, "vic", role="viewer"),
        "alice": user_token(dsn, "alice", role="operator"),
        "bob": user_token(dsn, "bob", role="operator"),
        "admin": user_token(dsn, "root", role="admin"),
        "runner": user_token(dsn, "node1", role="runner"),
    }
    clients = {who: credentials.client(app, token) for who, token in tokens.items()}
    for c in clients.values():
        c.__enter__()
    try:
        # Reads: everyone but a runner.
        for who, c in clients.items():
            expected = 403 if who == "runner" else 200
            assert c.get("/api/v1/workflows/").status_code == expected, who
            assert c.get("/models/").status_code == expected, who
        # Submitting: operators and admins; the workflow records who.
        for who in ("viewer", "runner"):
            refused = clients[who].post("/api/v1/workflows/", json=DAG)
            assert refused.status_code == 403, who
            assert clients[who].post("/models/upload/", json={}).status_code == 403, who
        alices = clients["alice"].post("/api/v1/workflows/", json=DAG).json()["data"]["id"]
        owner = conn.execute("SELECT submitted_by FROM workflows WHERE id = %s", [alices])
        assert owner.fetchone()[0] == user_id(conn, "alice")
        shown = clients["viewer"].get(f"/api/v1/workflows/{alices}").json()["data"]
        assert shown["submitted_by"] == "alice"
        listed = clients["viewer"].get("/api/v1/workflows/").json()["data"]
        assert [w["submitted_by"] for w in listed] == ["alice"]
        actor = conn.execute("SELECT actor FROM events WHERE workflow_id = %s LIMIT 1", [alices])
        assert actor.fetchone()[0].startswith("api:alice@")
        # Cancelling: only one's own, unless an admin.
        jobs = clients["alice"].get(f"/api/v1/workflows/{alices}/jobs").json()["data"]
        job_cancel = f"/api/v1/jobs/{jobs[0]['id']}/cancel"
        cancel = f"/api/v1/workflows/{alices}/cancel"
        for who in ("viewer", "runner", "bob"):
            assert clients[who].post(cancel).status_code == 403, who
            assert clients[who].post(job_cancel).status_code == 403, who
        status = "SELECT status::text FROM workflows WHERE id = %s"
        assert conn.execute(status, [alices]).fetchone()[0] == "pending"
        assert clients["alice"].post(cancel).status_code == 200
        bobs = clients["bob"].post("/api/v1/workflows/", json=DAG).json()["data"]["id"]
        assert clients["admin"].post(f"/api/v1/workflows/{bobs}/cancel").status_code == 200
        # One submitted with database credentials belongs to no API user: admins only.
        cli_workflow, _ = a_workflow(conn)
        assert clients["alice"].post(f"/api/v1/workflows/{cli_workflow}/cancel").status_code == 403
        assert clients["admin"].post(f"/api/v1/workflows/{cli_workflow}/cancel").status_code == 200
        # Everyone may ask who they are.
        for who, c in clients.items():
            me = c.get("/api/auth/me")
            assert me.status_code == 200 and me.json()["data"]["role"] in auth.ROLES, who
    finally:
        for c in clients.values():
            c.__exit__(None, None, None)


def test_a_user_recreated_under_the_same_name_inherits_nothing(app, dsn, conn) -> None:
    token = user_token(dsn, "alice", role="operator")
    with credentials.client(app, token) as alice:
        workflow_id = alice.post("/api/v1/workflows/", json=DAG).json()["data"]["id"]
    assert cli(dsn, "api", "user", "remove", "alice").returncode == 0
    with credentials.client(app, token) as old_token:
        assert old_token.get("/api/v1/workflows/").status_code == 401
    assert conn.execute("SELECT submitted_by FROM workflows").fetchone()[0] is None
    token = user_token(dsn, "alice", role="operator")
    with credentials.client(app, token) as new_alice:
        refused = new_alice.post(f"/api/v1/workflows/{workflow_id}/cancel")
        assert refused.status_code == 403, refused.text


def test_api_tokens_from_the_cli_expire_and_are_revoked(app, dsn, conn) -> None:
    assert cli(dsn, "api", "user", "add", "ci", "--no-password").returncode == 0
    made = cli(dsn, "api", "token", "create", "--user", "ci", "--expires", "90d", "--name", "CI")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith(auth.API_TOKEN_PREFIX) and "\n" not in token
    stored = [bytes(r[0]) for r in conn.execute("SELECT token_hash FROM api_tokens")]
    assert token.encode() not in stored
    listed = cli(dsn, "api", "token", "list")
    assert "CI" in listed.stdout and token not in listed.stdout
    token_id = int(re.search(r"token (\d+)", made.stderr).group(1))
    with credentials.client(app, token) as c:
        assert c.get("/api/v1/runners/").status_code == 200
        conn.execute("UPDATE api_tokens SET expires_at = now() - interval '1 s'")
        expired = c.get("/api/v1/runners/")
        assert expired.status_code == 401 and "invalid_token" in expired.headers["www-authenticate"]
        conn.execute("UPDATE api_tokens SET expires_at = NULL")
        assert c.get("/api/v1/runners/").status_code == 200
        assert cli(dsn, "api", "token", "revoke", str(token_id)).returncode == 0
        assert c.get("/api/v1/runners/").status_code == 401
    # Changing a role revokes the user's tokens.
    token = cli(dsn, "api", "token", "create", "--user", "ci").stdout.strip()
    assert cli(dsn, "api", "user", "set-role", "ci", "viewer").returncode == 0
    with credentials.client(app, token) as c:
        assert c.get("/api/v1/runners/").status_code == 401
    # Bad input: exit 2 with the problem named, nothing written.
    for args, problem in (
        (("token", "create", "--user", "nobody"), "no user 'nobody'"),
        (("token", "create", "--user", "ci", "--expires", "soon"), "not a duration"),
        (("token", "revoke", "999999"), "no api token 999999"),
        (("user", "set-role", "ci", "god"), "'god' is not one of"),
        (("user", "add", "x", "--role", "root"), "'root' is not one of"),
        (("user", "add", "x", "--no-password", "--update"), "--no-password"),
    ):
        failed = cli(dsn, "api", *args)
        assert failed.returncode == 2 and problem in failed.stderr, (args, failed.stderr)
    assert conn.execute("SELECT count(*) FROM api_tokens").fetchone()[0] == 0


def test_browser_session_cookie_and_logout(app, dsn, conn) -> None:
    user_token(dsn, "alice", role="operator")
    with credentials.client(app) as browser:
        page = browser.get("/login?next=/")
        assert (
            page.status_code == 200
            and "form-action 'self'" in page.headers["content-security-policy"]
        )
        wrong = sign_in(browser, "alice", "wrong password")
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        assert SESSION_COOKIE not in browser.cookies
        signed_in = sign_in(browser, "alice")
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        cookie = signed_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain http on loopback
        assert browser.get("/api/auth/me").json()["data"] == {"name": "alice", "role": "operator"}
        assert browser.get("/", headers={"accept": "text/html"}).status_code == 200
        # Never an open redirect.
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            away = browser.post(
                f"/login?next={target}",
                data={"name": "alice", "password": PASSWORD},
                follow_redirects=False,
            )
            assert away.headers["location"] == "/", target
        session = browser.cookies[SESSION_COOKIE]
        out = browser.post("/logout", headers={"origin": "http://localhost"})
        assert out.status_code == 204
        # Ended server-side: the old cookie is refused even if a copy was kept.
        browser.cookies.set(SESSION_COOKIE, session)
        assert browser.get("/api/auth/me").status_code == 401
        again = browser.get("/", headers={"accept": "text/html"}, follow_redirects=False)
        assert again.status_code == 303 and again.headers["location"].startswith("/login")
    # Served over TLS, the cookie is Secure.
    with TestClient(app, base_url="https://localhost", raise_server_exceptions=False) as tls:
        assert "Secure" in sign_in(tls, "alice").headers["set-cookie"]


def test_dafni_logout_takes_only_refresh_tokens_and_ends_only_that_session(app, dsn) -> None:
    user_token(dsn, "alice", role="operator")
    token_path = "/realms/Production/protocol/openid-connect/token/"
    logout = "/realms/Production/protocol/openid-connect/logout"
    form = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    with credentials.client(app) as c:
        first, second = (c.post(token_path, data=form).json() for _ in range(2))
        assert c.post(logout, data={"refresh_token": first["access_token"]}).status_code == 400
        assert c.get("/models/", headers=bearer(first["access_token"])).status_code == 200
        assert c.post(logout, data={"refresh_token": first["refresh_token"]}).status_code == 204
        assert c.get("/models/", headers=bearer(first["access_token"])).status_code == 401
        assert c.get("/models/", headers=bearer(second["access_token"])).status_code == 200
        nul = c.post(token_path, data={**form, "username": "al\0ice"})
        assert nul.status_code == 400 and "NUL" in nul.text


def test_failed_sign_ins_are_throttled_across_api_processes(dsn, tmp_path) -> None:
    user_token(dsn, "alice", role="operator")
    token_path = "/realms/Production/protocol/openid-connect/token/"
    form = {"grant_type": "password", "username": "alice", "password": "guess"}
    # Two apps on one database: two API processes, throttled alike.
    one, two = (create_app(dsn) for _ in range(2))
    with credentials.client(one) as a, credentials.client(two) as b:
        for attempt in range(auth.FREE_FAILURES["user"]):
            client = a if attempt % 2 else b
            assert client.post(token_path, data=form).status_code == 401
        started = a.post(token_path, data=form)  # this one starts the block: not answered
        assert started.status_code == 429 and "invalid_grant" not in started.text
        for client in (a, b):
            blocked = client.post(token_path, data={**form, "password": PASSWORD})
            assert blocked.status_code == 429, blocked.text
            assert 1 <= int(blocked.headers["retry-after"]) <= 2
            page = sign_in(client, "alice")
            assert page.status_code == 429 and "retry-after" in page.headers
        # The next failure doubles the wait: growing, not a lockout.
        time.sleep(int(blocked.headers["retry-after"]) + 0.1)
        assert b.post(token_path, data=form).status_code == 429  # a new, longer block
        longer = a.post(token_path, data={**form, "password": PASSWORD})
        assert longer.status_code == 429 and int(longer.headers["retry-after"]) >= 3
        time.sleep(int(longer.headers["retry-after"]) + 0.1)
        # The right password works after the window and forgives the user's failures.
        assert b.post(token_path, data={**form, "password": PASSWORD}).status_code == 200
        assert a.post(token_path, data=form).status_code == 401


def test_a_sign_in_flood_does_not_stall_other_routes(dsn) -> None:
    """200 concurrent sign-ins (right password: each one scrypt) against a real server while
    another user reads: the reads never wait for the hashing (was 5.9 s)."""
    reader = user_token(dsn, "reader", role="viewer")
    server = ApiServer(create_app(dsn))
    token_path = f"{server.url}/realms/Production/protocol/openid-connect/token/"
    form = {"grant_type": "password", "username": "reader", "password": PASSWORD}

    async def flood() -> tuple[list[int], list[float]]:
        limits = httpx2.Limits(max_connections=300)
        async with httpx2.AsyncClient(timeout=120, limits=limits) as client:
            latencies: list[float] = []
            done = asyncio.Event()

            async def read() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    response = await client.get(
                        f"{server.url}/api/v1/runners/", headers=bearer(reader)
                    )
                    assert response.status_code == 200
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)

            reading = asyncio.create_task(read())
            results = await asyncio.gather(
                *(client.post(token_path, data=form) for _ in range(200))
            )
            done.set()
            await reading
            return [r.status_code for r in results], latencies

    try:
        statuses, latencies = asyncio.run(flood())
    finally:
        server.stop()
    print(
        f"sign-ins: {statuses.count(200)} ok, {statuses.count(429)} turned away; reads: "
        f"{len(latencies)}, max {max(latencies) * 1000:.0f} ms"
    )
    # Past the queue's bound a sign-in is turned away at once (429, Retry-After), not queued.
    assert set(statuses) <= {200, 429} and statuses.count(200) >= MAX_WAITING_SIGN_INS, statuses
    assert len(latencies) >= 10
    assert max(latencies) < 2.0, sorted(latencies)[-5:]


def test_metrics_token(dsn) -> None:
    with credentials.client(create_app(dsn, metrics_token="scrape-secret")) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer("wrong")).status_code == 401
        assert c.get("/metrics", headers=bearer("scrape-secret")).status_code == 200


def test_dafni_upload_urls_never_come_from_the_host_header(dsn, tmp_path) -> None:
    token = user_token(dsn, "alice", role="operator")
    app = create_app(dsn, allowed_hosts=[".example.org"], public_url="https://smifdb.example.org/")
    with credentials.client(app, token) as c:
        urls = c.post("/models/upload/", headers={"host": "x.example.org"}).json()["urls"]
        assert urls["definition"].startswith("https://smifdb.example.org/models/upload/")
    with credentials.client(create_app(dsn), token) as c:
        urls = c.post("/models/upload/", headers={"host": "localhost:9"}).json()["urls"]
        assert not urls["definition"].startswith("http://localhost:9/")


def test_dafni_new_versions_only_from_their_owner(app, dsn) -> None:
    tokens = {who: user_token(dsn, who, role="operator") for who in ("alice", "bob")}
    tokens["root"] = user_token(dsn, "root", role="admin")
    clients = {who: credentials.client(app, t) for who, t in tokens.items()}
    definition = {
        "kind": "M",
        "api_version": "v1beta3",
        "metadata": {"display_name": "m", "name": "m", "summary": "s", "description": "d"},
        "spec": {"command": "true"},
    }
    import yaml

    try:
        for c in clients.values():
            c.__enter__()

        def upload(who: str, model_id: str | None = None):
            c = clients[who]
            started = c.post("/models/upload/", json={}).json()
            put = c.put(
                f"/models/upload/{started['id']}/definition/", content=yaml.safe_dump(definition)
            )
            assert put.status_code == 204, put.text
            path = f"/models/upload/{started['id']}/ingest/"
            if model_id:
                path = f"/models/{model_id}/upload/{started['id']}/ingest/"
            return c.post(path, json={"version_message": who})

        first = upload("alice")
        assert first.status_code == 201, first.text
        model_id = clients["alice"].get(f"/models/{first.json()['version_id']}/").json()["parent"]
        stolen = upload("bob", model_id)
        assert stolen.status_code == 403 and "alice" in stolen.text
        assert upload("alice", model_id).status_code == 201
        assert upload("root", model_id).status_code == 201
        versions = clients["bob"].get("/models/").json()
        assert sorted(v["owner"] for v in versions) == ["alice", "alice", "root"]
    finally:
        for c in clients.values():
            c.__exit__(None, None, None)


def test_api_serve_refuses_a_public_bind_without_allowed_hosts(dsn) -> None:
    refused = cli(dsn, "api", "serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert refused.returncode == 2 and "--allowed-host" in refused.stderr, refused.stderr
    bad_url = cli(dsn, "api", "serve", "--public-url", "smifdb.example.org", timeout=60)
    assert bad_url.returncode == 2 and "--public-url" in bad_url.stderr


def test_api_serve_warns_without_tls_beyond_loopback(dsn, procs) -> None:
    port = str(free_port())
    server = procs.spawn(
        "api",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--allowed-host",
        "smifdb.test",
        log_name="api",
    )
    wait_for(lambda: "without TLS" in procs.output("api"), what="the warning")
    server.terminate()
    server.wait(10)


def test_a_burst_of_guesses_learns_no_more_than_the_free_ones(dsn) -> None:
    """Concurrent guesses all pass the first check before any is counted; those answered
    after the block began say nothing, and neither does the right password then."""
    user_token(dsn, "alice", role="operator")
    server = ApiServer(create_app(dsn))
    token_path = f"{server.url}/realms/Production/protocol/openid-connect/token/"
    form = {"grant_type": "password", "username": "alice"}

    async def burst() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(token_path, data={**form, "password": f"guess {i}"})
                    for i in range(30)
                )
            )

    try:
        statuses = [r.status_code for r in asyncio.run(burst())]
        right = httpx2.post(token_path, data={**form, "password": PASSWORD}, timeout=60)
    finally:
        server.stop()
    assert statuses.count(401) <= auth.FREE_FAILURES["user"], statuses
    assert set(statuses) <= {401, 429}
    assert right.status_code == 429 and "access_token" not in right.text


def test_viewers_and_runners_change_nothing_on_any_route(app, dsn, conn) -> None:
    """Every state-changing route of the route table, with real ids in its path: 403 for a
    viewer and a runner, and nothing written."""
    workflow_id, job_id = a_workflow(conn)
    tokens = {role: user_token(dsn, f"a-{role}", role=role) for role in ("viewer", "runner")}
    before = snapshot(conn)
    checked = 0
    with credentials.client(app) as c:
        for route in app.routes:
            if not isinstance(route, Route):
                continue
            path = concrete(route.path, workflow_id, job_id)
            for method in (route.methods or set()) - {"GET", "HEAD"}:
                public = any(method in m and p.fullmatch(path) for m, p in PUBLIC)
                if public or path == "/logout":
                    continue
                for role, token in tokens.items():
                    if role == "runner" and path.startswith("/api/runner/"):
                        continue  # the runner protocol is what a runner token is for
                    if role == "viewer" and READING_POSTS.fullmatch(path):
                        continue  # searches that only read (and write nothing: see below)
                    response = c.request(method, path, json=DAG, headers=bearer(token))
                    assert response.status_code == 403, (role, method, path, response.text)
                    checked += 1
    assert checked >= 2 * 15
    assert snapshot(conn) == before


def test_a_revoked_runner_token_is_refused_within_a_second(app, dsn, conn) -> None:
    """Runner tokens found valid are taken as valid for RUNNER_TOKEN_TTL (no query per
    runner request); a revoked one, or one whose user is no longer a runner, is then refused.
    Other routes check the token on every request."""
    token = user_token(dsn, "shortlived", role="runner")
    other = user_token(dsn, "demoted", role="runner")
    with credentials.client(app, token) as c:
        call = "/api/runner/v1/unfinished"
        assert c.post(call, json={}).status_code == 200
        (token_id,) = [t["id"] for t in auth.api_tokens(conn, "shortlived")]
        auth.revoke_api_token(conn, token_id)
        revoked = time.monotonic()
        wait_for(lambda: c.post(call, json={}).status_code == 401, 5, "the revocation")
        assert time.monotonic() - revoked < RUNNER_TOKEN_TTL + 1.0
        assert c.get("/api/auth/me").status_code == 401  # not cached off the runner protocol
        c.headers.update(bearer(other))
        assert c.post(call, json={}).status_code == 200
        assert cli(dsn, "api", "user", "set-role", "demoted", "viewer").returncode == 0
        wait_for(lambda: c.post(call, json={}).status_code == 401, 5, "the role change")
