"""The dashboard at ``/``: served by the API app, and driven in headless Chromium through Selenium
against a real database, a real uvicorn server and a real runner process."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import credentials
import httpx2
import psycopg
import pytest
from credentials import bearer, user_token
from processes import ApiServer, submit_loop_model_run, wait_for
from starlette.testclient import TestClient

from smifdb.api import create_app
from smifdb.api.dashboard import STATIC

# CI sets this: a missing browser or selenium is a failure there, not a skip.
REQUIRE_BROWSER = bool(os.environ.get("SMIFDB_TEST_REQUIRE_BROWSER"))
POLL_MS = 250  # the page's polling period in these tests (?poll_ms=); the default is 1 s


# -- without a browser ---------------------------------------------------------------------------


@pytest.fixture
def client(dsn: str) -> Iterator[TestClient]:
    with credentials.client(create_app(dsn), user_token(dsn)) as c:
        yield c


def test_page_and_static_assets_are_served(client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/dashboard.js"' in page.text
    assert 'href="/static/dashboard.css"' in page.text
    for name, kind in (
        ("dashboard.js", "javascript"),
        ("dashboard.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200, name
        assert kind in asset.headers["content-type"], (name, asset.headers["content-type"])
        assert asset.content == (STATIC / name).read_bytes()
    assert client.get("/static/nothing.js").status_code == 404
    assert client.get("/static/../dashboard.py").status_code == 404
    assert client.post("/").status_code == 405


def test_static_files_use_no_html_injection_and_no_outside_resources() -> None:
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    for path in STATIC.iterdir():
        urls = re.findall(r"https?://[^\s\"'<>)]+", path.read_text())
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


def test_job_cancel_endpoint(client, conn) -> None:
    spec = {
        "name": "cancel-one",
        "jobs": [
            {"key": "a", "command": "true"},
            {"key": "b", "command": "true", "after": ["a"]},
            {"key": "c", "command": "true"},
        ],
    }
    workflow_id = client.post("/api/v1/workflows/", json=spec).json()["data"]["id"]
    jobs = {j["key"]: j for j in client.get(f"/api/v1/workflows/{workflow_id}/jobs").json()["data"]}
    response = client.post(f"/api/v1/jobs/{jobs['a']['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["data"] == {"cancelled": 2, "terminating": 0}  # a and b after it
    statuses = dict(
        conn.execute("SELECT key, status::text FROM jobs WHERE workflow_id = %s", [workflow_id])
    )
    assert statuses == {"a": "cancelled", "b": "cancelled", "c": "ready"}
    again = client.post(f"/api/v1/jobs/{jobs['a']['id']}/cancel")
    assert again.status_code == 409 and "already finished" in again.json()["error"]["message"]
    assert client.post("/api/v1/jobs/999999/cancel").status_code == 404
    assert client.get(f"/api/v1/jobs/{jobs['c']['id']}/cancel").status_code == 405


# -- in a browser --------------------------------------------------------------------------------


@pytest.fixture
def server(dsn: str) -> Iterator[ApiServer]:
    s = ApiServer(create_app(dsn))
    s.token = user_token(dsn)  # an admin, who signs in to the dashboard as a person would
    yield s
    s.stop()


def sign_in(driver: Any, server: ApiServer, next_path: str) -> None:
    """Through the login page: the dashboard sends a signed-out browser there, and back."""
    driver.get(f"{server.url}{next_path}")
    wait_for(lambda: "/login" in driver.current_url, what="the login page")
    driver.find_element("name", "name").send_keys("admin")
    driver.find_element("name", "password").send_keys(credentials.PASSWORD)
    driver.find_element("css selector", "button[type=submit]").click()
    wait_for(lambda: "/login" not in driver.current_url, what="the dashboard after signing in")
    cookie = driver.get_cookie("smifdb_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    driver.get(f"{server.url}{next_path}")  # the #fragment never reaches the server


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"SMIFDB_TEST_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium with the system's chromedriver (Selenium Manager never downloads)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install '.[test]')")
    chromium = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        _unavailable(
            "no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, should it run, stays offline
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        "--window-size=1500,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def node_statuses(driver: Any) -> dict[str, str]:
    return js(
        driver,
        "return Object.fromEntries([...document.querySelectorAll('#dag g[data-job-key]')]"
        ".map(g => [g.dataset.jobKey, g.dataset.status]))",
    )


def polls(driver: Any) -> int:
    return int(js(driver, "return Number(document.body.dataset.polls || 0)"))


def next_poll(driver: Any) -> None:
    """Wait until the page has finished a poll that began after now."""
    seen = polls(driver)
    wait_for(lambda: polls(driver) >= seen + 2, timeout=15, what="the page to poll the API")


def click(driver: Any, css: str) -> None:
    wait_for(lambda: js(driver, "return !!document.querySelector(arguments[0])", css), what=css)
    driver.find_element("css selector", css).click()


def confirm(driver: Any) -> None:
    """Answer the page's own confirmation dialog."""
    wait_for(
        lambda: js(driver, "return !document.getElementById('confirm').hidden"), what="confirm"
    )
    driver.find_element("css selector", "#confirm-yes").click()
    wait_for(lambda: js(driver, "return document.getElementById('confirm').hidden"), what="close")


def banner(driver: Any) -> str:
    return js(
        driver,
        "const b = document.getElementById('banner'); return b.hidden ? '' : b.textContent",
    )


def severe_console_errors(driver: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    entries = driver.get_log("browser")
    return [
        e["message"]
        for e in entries
        if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)
    ]


def submit(server: ApiServer, spec: dict) -> int:
    response = httpx2.post(
        f"{server.url}/api/v1/workflows/", json=spec, headers=bearer(server.token), timeout=30
    )
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


def db_statuses(dsn: str, workflow_id: int) -> tuple[str, dict[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        workflow = conn.execute("SELECT status::text FROM workflows WHERE id = %s", [workflow_id])
        jobs = conn.execute(
            "SELECT key, status::text FROM jobs WHERE workflow_id = %s", [workflow_id]
        )
        return workflow.fetchone()[0], dict(jobs.fetchall())


# A key that would run script if it were ever put into the page as HTML.
NASTY = 'report <img src=x onerror="window.pwned=1"> & "q"'
DIAMOND = {
    "name": "dashboard-diamond",
    "jobs": [
        {"key": "prepare", "command": "echo prepare-log-line; sleep 1"},
        {"key": "left", "command": "sleep 1.5", "after": ["prepare"]},
        {"key": "right", "command": "echo right-side; sleep 1", "after": ["prepare"]},
        {"key": NASTY, "command": "echo joined", "after": ["left", "right"]},
    ],
}
LONG = {
    "name": "dashboard-long",
    "jobs": [
        {"key": "long", "command": "sleep 120"},
        {"key": "after-long", "command": "true", "after": ["long"]},
        {"key": "other", "command": "sleep 120"},
    ],
}


def test_dashboard_follows_a_workflow_live_and_cancels_another(
    dsn, server, procs, browser, tmp_path
) -> None:
    driver = browser
    workflow_id = submit(server, DIAMOND)
    sign_in(driver, server, f"/?poll_ms={POLL_MS}#workflow={workflow_id}")

    # The DAG is drawn, one node per job, before any runner exists.
    keys = {j["key"] for j in DIAMOND["jobs"]}
    wait_for(lambda: set(node_statuses(driver)) == keys, what="every job in the DAG")
    assert node_statuses(driver) == {
        "prepare": "ready",
        "left": "waiting",
        "right": "waiting",
        NASTY: "waiting",
    }
    assert js(driver, "return document.querySelectorAll('#dag path.edge').length") == 4
    # Layered: prepare, then left and right side by side, then the join.
    xs = js(
        driver,
        "return Object.fromEntries([...document.querySelectorAll('#dag g[data-job-key]')]"
        ".map(g => [g.dataset.jobKey, g.transform.baseVal[0].matrix.e]))",
    )
    assert xs["prepare"] < xs["left"] == xs["right"] < xs[NASTY]
    assert js(driver, "return window.pwned === undefined && !document.querySelector('img')")
    assert js(driver, "return document.querySelectorAll('#legend li').length") == 7
    assert banner(driver) == ""

    # A real runner: the statuses change, live, until every job has succeeded.
    procs.start("--slots", "2", name="dash-runner")
    seen: dict[str, list[str]] = {k: [] for k in keys}

    def all_succeeded() -> bool:
        for key, status in node_statuses(driver).items():
            if not seen[key] or seen[key][-1] != status:
                seen[key].append(status)
        return all(history and history[-1] == "succeeded" for history in seen.values())

    wait_for(all_succeeded, timeout=60, what=f"every node to turn succeeded (seen {seen})")
    assert seen["prepare"][0] == "ready" and "running" in seen["prepare"], seen
    assert seen["left"][0] == "waiting" and "running" in seen["left"], seen
    assert all(len(h) >= 2 for h in seen.values()), seen
    wait_for(
        lambda: js(
            driver,
            "return document.getElementById('workflow-panel').dataset.status === 'succeeded'"
            " && document.querySelector('#legend li[data-status=succeeded] .n').textContent === '4'",
        ),
        what="the workflow to show as succeeded with 4 succeeded jobs",
    )
    item = f"#workflow-item-{workflow_id}"
    wait_for(
        lambda: (
            js(driver, f"return document.querySelector('{item}')?.dataset.status") == "succeeded"
        ),
        what="the workflow list to show it succeeded",
    )
    wait_for(
        lambda: js(
            driver,
            "return document.querySelector('#runners-table tr[data-runner=dash-runner]')"
            "?.textContent.includes('dash-runner')",
        ),
        what="the runner in the runners panel",
    )

    # Job detail: clicking a node shows its status, runner, log tail and events.
    click(driver, '#dag g[data-job-key="prepare"]')
    wait_for(
        lambda: js(
            driver,
            "const p = document.getElementById('job-panel');"
            "return !p.hidden && p.dataset.jobKey === 'prepare'"
            " && document.getElementById('job-log').textContent.includes('prepare-log-line')",
        ),
        what="the job panel with prepare's log",
    )
    field = "return document.getElementById(arguments[0]).textContent"
    assert js(driver, field, "job-field-runner") == "dash-runner"
    assert js(driver, field, "job-field-status") == "succeeded"
    assert js(driver, field, "job-field-exit-code") == "0"
    assert js(driver, field, "job-field-attempts") == "1 of 1"
    events = js(
        driver,
        "return [...document.querySelectorAll('#job-events tbody tr')]"
        ".map(r => r.children[2].textContent)",
    )
    assert events == ["ready", "running", "succeeded"]
    assert js(driver, "return document.getElementById('job-cancel').hidden")
    assert "job=" in driver.current_url
    # The nasty key is shown as text, never markup.
    click(driver, f"#dag g[data-job-key='{NASTY}']")
    wait_for(
        lambda: js(driver, "return document.getElementById('job-title').textContent") == NASTY,
        what="the nasty key as the job panel's title",
    )
    assert js(driver, "return window.pwned === undefined && !document.querySelector('img')")
    driver.save_screenshot(str(tmp_path / "dashboard-succeeded.png"))

    # A second, long workflow: cancel one running job from its panel, then the workflow.
    long_id = submit(server, LONG)
    click(driver, f"#workflow-item-{long_id}")
    wait_for(
        lambda: (
            node_statuses(driver)
            == {"long": "running", "after-long": "waiting", "other": "running"}
        ),
        what="both long jobs running",
    )
    assert js(driver, "return document.getElementById('job-panel').hidden")  # selection reset
    click(driver, '#dag g[data-job-key="long"]')
    wait_for(
        lambda: js(
            driver,
            "const p = document.getElementById('job-panel');"
            "return !p.hidden && p.dataset.jobKey === 'long' && p.dataset.status === 'running'",
        ),
        what="the running job's panel",
    )
    click(driver, "#job-cancel")
    confirm(driver)
    wait_for(
        lambda: (
            db_statuses(dsn, long_id)[1]
            == {"long": "cancelled", "after-long": "cancelled", "other": "running"}
        ),
        what="the job and its downstream to be cancelled in the database",
    )
    wait_for(
        lambda: node_statuses(driver)["long"] == "cancelled", what="the cancelled node to show"
    )
    driver.save_screenshot(str(tmp_path / "dashboard-job-cancelled.png"))

    # The confirmation can be declined: nothing happens.
    click(driver, "#workflow-cancel")
    wait_for(lambda: js(driver, "return !document.getElementById('confirm').hidden"), what="ask")
    driver.find_element("css selector", "#confirm-no").click()
    next_poll(driver)
    assert db_statuses(dsn, long_id)[0] == "running"

    click(driver, "#workflow-cancel")
    confirm(driver)
    wait_for(
        lambda: (
            db_statuses(dsn, long_id)
            == ("cancelled", {"long": "cancelled", "after-long": "cancelled", "other": "cancelled"})
        ),
        what="the workflow to end cancelled in the database",
    )
    wait_for(
        lambda: (
            set(node_statuses(driver).values()) == {"cancelled"}
            and js(driver, "return document.getElementById('workflow-panel').dataset.status")
            == "cancelled"
        ),
        what="the dashboard to show the workflow cancelled",
    )
    assert js(driver, "return document.getElementById('workflow-cancel').hidden")
    driver.save_screenshot(str(tmp_path / "dashboard-cancelled.png"))
    assert banner(driver) == ""
    assert severe_console_errors(driver) == []


def test_dashboard_big_workflow_table_model_run_kill_and_errors(
    dsn, server, browser, tmp_path
) -> None:
    driver = browser
    # A smifdb model run (generic decision loop) submitted from the CLI; no manager, so it stays
    # running after its first bundle: the dashboard kills it.
    project = tmp_path / "project"
    project.mkdir()
    submit_loop_model_run(dsn, project)
    workflow_id = submit(
        server,
        {"name": "wide", "jobs": [{"key": f"job-{i}", "command": "true"} for i in range(5)]},
    )
    # Drawn as a table past max_nodes (1500 by default; 3 here).
    sign_in(driver, server, f"/?poll_ms={POLL_MS}&max_nodes=3#workflow={workflow_id}")
    rows = (
        "return [...document.querySelectorAll('#jobs-table tbody tr')].map(r => r.dataset.jobKey)"
    )
    wait_for(lambda: len(js(driver, rows)) == 5, what="the big-workflow table")
    assert sorted(js(driver, rows)) == [f"job-{i}" for i in range(5)]
    assert not js(driver, "return document.querySelector('#dag')")
    assert "too many to draw" in js(driver, "return document.getElementById('graph').textContent")
    click(driver, '#jobs-table tr[data-job-key="job-3"]')
    wait_for(
        lambda: js(driver, "return document.getElementById('job-panel').dataset.jobKey") == "job-3",
        what="the job panel from a table row",
    )

    # The model run's Kill button (after confirming) cancels it.
    kill = '#model-runs [data-model-run-name="loop"] button[data-action="kill-model-run"]'
    wait_for(lambda: js(driver, f"return !!document.querySelector('{kill}')"), what="model run")
    item = f"return document.querySelector('{kill}').closest('.item').dataset.status"
    assert js(driver, item) == "running"
    click(driver, kill)
    confirm(driver)

    def model_run_status() -> str:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("SELECT status::text FROM model_runs").fetchone()[0]

    wait_for(lambda: model_run_status() == "cancelled", what="the model run to be cancelled")
    wait_for(
        lambda: (
            js(
                driver,
                "return document.querySelector('#model-runs [data-model-run-name=loop]')"
                ".dataset.status",
            )
            == "cancelled"
        ),
        what="the dashboard to show the model run cancelled",
    )

    # A refused action (409: the workflow has ended meanwhile) shows its message in the banner.
    js(driver, "document.body.dataset.confirm = 'off'")  # the documented way to skip confirm
    cancel = f"#workflow-item-{workflow_id} button[data-action=cancel-workflow]"
    wait_for(lambda: js(driver, f"return !!document.querySelector('{cancel}')"), what="button")
    js(driver, "document.getElementById('pause').click()")  # keep the stale button on screen
    wait_for(lambda: js(driver, "return document.body.dataset.polling") == "0", what="idle")
    httpx2.post(
        f"{server.url}/api/v1/workflows/{workflow_id}/cancel",
        headers=bearer(server.token),
        timeout=30,
    )
    driver.find_element("css selector", cancel).click()
    wait_for(lambda: "already finished" in banner(driver), what="the 409 in the banner")
    js(driver, "document.getElementById('pause').click()")
    driver.find_element("css selector", "#banner-close").click()

    # An unknown workflow: an error banner, and the rest of the page still works.
    driver.get(f"{server.url}/?poll_ms={POLL_MS}#workflow=999999")
    wait_for(lambda: "no workflow 999999" in banner(driver), what="a 404 banner")
    # The page still lists both workflows: the model run's first bundle and "wide".
    assert js(driver, "return document.querySelectorAll('#workflows .item').length") == 2

    # The API goes away: a banner says so and the last data stays on the page.
    driver.get(f"{server.url}/?poll_ms={POLL_MS}&max_nodes=3#workflow={workflow_id}")
    wait_for(lambda: len(js(driver, rows)) == 5, what="the table again")
    server.stop()
    wait_for(
        lambda: "cannot reach the api" in banner(driver).lower(), what="an unreachable-API banner"
    )
    assert js(driver, "return document.getElementById('live').dataset.state") == "error"
    assert len(js(driver, rows)) == 5
    driver.save_screenshot(str(tmp_path / "dashboard-offline.png"))
    allowed = ("Failed to load resource", "ERR_CONNECTION_REFUSED")
    assert severe_console_errors(driver, allowed) == []


def list_requests(driver: Any) -> list[str]:
    """The URLs of the list requests the page has made (resource timing entries)."""
    names = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    lists = re.compile(r"/api/v1/(workflows/(\d+/jobs)?|runners/|model_runs/)(\?|$)")
    return [n for n in names if lists.search(n)]


def test_dashboard_pages_through_lists_and_big_workflows(dsn, server, browser, tmp_path) -> None:
    """Sidebar lists and a big workflow's table show pages and turn them; a drawable DAG is read
    by following the cursors; no request ever asks for a list without a limit."""
    driver = browser
    small = [
        submit(server, {"name": f"small-{i}", "jobs": [{"key": "a", "command": "true"}]})
        for i in range(2)
    ]
    keys = [f"k{i}" for i in range(7)]
    big = submit(server, {"name": "paged", "jobs": [{"key": k, "command": "true"} for k in keys]})
    sign_in(
        driver, server, f"/?poll_ms={POLL_MS}&list_rows=2&table_rows=3&max_nodes=3#workflow={big}"
    )
    items = (
        "return [...document.querySelectorAll('#workflows .item')].map(e => e.dataset.workflowId)"
    )
    wait_for(lambda: js(driver, items) == [str(big), str(small[1])], what="the first page")
    assert js(driver, "return document.getElementById('workflows-pager').hidden") is False
    assert js(driver, "return document.getElementById('workflows-prev').disabled")
    click(driver, "#workflows-next")
    wait_for(lambda: js(driver, items) == [str(small[0])], what="the second page of workflows")
    wait_for(
        lambda: js(driver, "return document.getElementById('workflows-next').disabled"),
        what="no third page",
    )
    assert js(driver, "return document.getElementById('workflows-page').textContent") == "page 2"
    next_poll(driver)  # polling keeps to the page shown
    assert js(driver, items) == [str(small[0])]
    click(driver, "#workflows-prev")
    wait_for(lambda: js(driver, items) == [str(big), str(small[1])], what="back to the first page")

    # The big workflow's table: pages of three jobs in key order, turned both ways.
    rows = (
        "return [...document.querySelectorAll('#jobs-table tbody tr')].map(r => r.dataset.jobKey)"
    )
    wait_for(lambda: js(driver, rows) == keys[:3], what="the table's first page")
    note = "return document.getElementById('jobs-table-note').textContent"
    assert "7 jobs" in js(driver, note) and "jobs 1–3" in js(driver, note)
    seen = list(js(driver, rows))
    for expected in (keys[3:6], keys[6:]):
        click(driver, "#jobs-next")
        wait_for(lambda expected=expected: js(driver, rows) == expected, what=f"page {expected}")
        seen += js(driver, rows)
    assert seen == keys  # every job once, in order
    assert js(driver, "return document.getElementById('jobs-next').disabled")
    assert "jobs 7–7" in js(driver, note)
    click(driver, "#jobs-prev")
    wait_for(lambda: js(driver, rows) == keys[3:6], what="the previous page")
    click(driver, '#jobs-table tr[data-job-key="k4"]')
    wait_for(
        lambda: js(driver, "return document.getElementById('job-panel').dataset.jobKey") == "k4",
        what="the job panel from a paged row",
    )

    # A drawable DAG read one job a page: every node and edge, from four pages.
    diamond = submit(server, DIAMOND)
    driver.get(f"{server.url}/?poll_ms={POLL_MS}&jobs_page=1#workflow={diamond}")
    wait_for(
        lambda: set(node_statuses(driver)) == {j["key"] for j in DIAMOND["jobs"]},
        what="every job of the DAG, page by page",
    )
    assert js(driver, "return document.querySelectorAll('#dag path.edge').length") == 4
    jobs_requests = [u for u in list_requests(driver) if f"/workflows/{diamond}/jobs" in u]
    assert len(jobs_requests) >= 4 and all("limit=1" in u for u in jobs_requests)
    assert any("cursor=" in u for u in jobs_requests)
    requested = list_requests(driver)
    assert requested and all("limit=" in u for u in requested), requested

    # A workflow of 100,000 jobs: a table of one page of 500 at a time, the next page on demand.
    from smifdb.spec import Dag, Job
    from smifdb.store.submit import submit_dag

    many = [
        Job(key=f"m{i:06d}", kind="command", payload={"argv": ["true"]}) for i in range(100_000)
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        huge = submit_dag(conn, Dag(name="huge", jobs=many), actor="test")
    driver.get(f"{server.url}/?poll_ms={POLL_MS}#workflow={huge}")
    wait_for(lambda: js(driver, rows) == [j.key for j in many[:500]], what="the first 500 jobs")
    assert "100000 jobs" in js(driver, note) and "jobs 1–500" in js(driver, note)
    click(driver, "#jobs-next")
    wait_for(lambda: js(driver, rows) == [j.key for j in many[500:1000]], what="jobs 501-1000")
    huge_requests = [u for u in list_requests(driver) if f"/workflows/{huge}/jobs" in u]
    assert huge_requests and all("limit=500" in u for u in huge_requests), huge_requests
    assert banner(driver) == ""
    assert severe_console_errors(driver) == []
