"""A real smif model run's results through /api/v1/model_runs/{name}/results and the dashboard.

The sample project's energy_water_cp_cr (CSV files) and energy_central (parquet, four decision
iterations) run once for the module through real runners and a manager; each answer is
compared with what `smifdb modelrun export` writes, read here with pandas.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import credentials
import pandas
import pytest
from conftest import create_database, drop_database
from processes import ApiServer, Runners, cli, wait_for
from starlette.testclient import TestClient

from smifdb import db
from smifdb.api import create_app
from smifdb.store import modelruns

if os.environ.get("SMIFDB_TEST_REQUIRE_SMIF"):
    import smif  # noqa: F401
else:
    pytest.importorskip("smif", reason="the smif extra is not installed")

from test_dashboard import browser, js, severe_console_errors  # noqa: F401 - the fixture
from test_smif import SMIF

ENV = {**os.environ, "PYTHONHASHSEED": "0"}
FILE = re.compile(
    r"(?P<run>[^/]+)/(?P<model>[^/]+)/decision_(?P<decision>\d+)/"
    r"output_(?P<output>.+?)_timestep_(?P<timestep>\d+)\.(?P<ext>csv|parquet)"
)
RUNS = {"energy_water_cp_cr": "local_csv", "energy_central": "local_binary"}


class Ran:
    """The module's database, its finished model runs and their exported results."""

    def __init__(self, dsn: str, exported: Path, ids: dict[str, int]) -> None:
        self.dsn, self.exported, self.ids = dsn, exported, ids
        self.token = credentials.user_token(dsn, "reader", role="viewer")

    def files(self, run: str) -> dict[tuple[str, str, int, int], Path]:
        """(model, output, timestep, decision): the file smif wrote, as exported."""
        found = {}
        for path in (self.exported / run).rglob("*"):
            m = FILE.fullmatch(path.relative_to(self.exported).as_posix())
            if m:
                key = (m["model"], m["output"], int(m["timestep"]), int(m["decision"]))
                found[key] = path
        return found


def read_exported(path: Path) -> list[dict[str, Any]]:
    """A results file's rows, as pandas reads smif's format."""
    if path.suffix == ".csv":
        frame = pandas.read_csv(path)
    else:
        frame = pandas.read_parquet(path).reset_index()
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        for r in frame.to_dict("records")
    ]


@pytest.fixture(scope="module")
def ran(
    pg_server: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ran]:
    tmp = tmp_path_factory.mktemp("results")
    name = f"smifdb_results_{os.getpid()}"
    dsn = create_database(pg_server, name, template=template_db)
    folder = tmp / "sample"
    subprocess.run([SMIF, "setup", "-d", str(folder)], check=True, capture_output=True)
    # energy_central's data as parquet too, for its local_binary run (smif's own converter).
    convert = [SMIF, "prepare-convert", "energy_central", "-d", str(folder)]
    subprocess.run(convert, check=True, capture_output=True)
    procs = Runners(dsn, tmp)
    try:
        ids = {}
        for run, interface in RUNS.items():
            args = ["modelrun", "submit", str(folder), run, "--interface", interface]
            result = cli(dsn, *args, env=ENV, timeout=300)
            assert result.returncode == 0, result.stderr
            ids[run] = int(result.stdout)
        for n in (1, 2):
            procs.start("--slots", "2", name=f"r{n}")
        procs.manager(name="manager")
        with db.connect(dsn) as conn:
            for run, model_run_id in ids.items():

                def ended(model_run_id: int = model_run_id) -> modelruns.ModelRun | None:
                    m = modelruns.get(conn, model_run_id)
                    return m if m.finished else None

                done = wait_for(ended, timeout=240, what=f"model run {run}")
                assert done.status == "succeeded", (run, done.error)
        exported = tmp / "exported"
        for model_run_id in ids.values():
            result = cli(dsn, "modelrun", "export", str(model_run_id), str(exported), "--force")
            assert result.returncode == 0, result.stderr
        yield Ran(dsn, exported, ids)
    finally:
        procs.close()
        drop_database(pg_server, name)


@pytest.fixture
def client(ran: Ran) -> Iterator[Any]:
    with credentials.client(create_app(ran.dsn), ran.token) as c:  # a viewer may read results
        yield c


def listing(client: Any, run: str) -> list[dict]:
    response = client.get(f"/api/v1/model_runs/{run}/results/")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["error"] == {}
    return body["data"]


def all_rows(client: Any, url: str, query: dict, limit: int) -> list[dict]:
    """Every page of one output's values, following ``next``."""
    rows: list[dict] = []
    cursor = None
    while True:
        params = {**query, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get(url, params=params)
        assert response.status_code == 200, response.text
        data, cursor = response.json()["data"], response.json()["next"]
        assert data["offset"] == len(rows)
        assert len(data["rows"]) <= limit
        rows += data["rows"]
        if cursor is None:
            assert len(rows) == data["total"]
            return rows
        assert response.headers["link"].endswith('rel="next"')


@pytest.mark.parametrize("run", list(RUNS))
def test_the_list_names_every_output_file_with_its_dimensions(ran, client, run) -> None:
    files = ran.files(run)
    assert files
    data = listing(client, run)
    named = {
        (o["model"], o["output"], r["timestep"], r["decision"]) for o in data for r in o["results"]
    }
    assert named == set(files)
    for entry in data:
        assert entry["dims"] == ["country"], entry
        assert entry["unit"] and entry["dtype"] == "float"
        assert entry["timesteps"] == sorted({r["timestep"] for r in entry["results"]})
    if run == "energy_central":
        assert len({d for o in data for d in o["decisions"]}) == 4  # one per bundle


@pytest.mark.parametrize("run", list(RUNS))
def test_values_equal_the_exported_files_as_json_pages_and_csv(ran, client, run) -> None:
    for (model, output, timestep, decision), path in sorted(ran.files(run).items()):
        url = f"/api/v1/model_runs/{run}/results/{model}/{output}"
        query = {"timestep": timestep, "decision": decision}
        response = client.get(url, params=query)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        expected = read_exported(path)
        assert data["rows"] == expected, path
        assert data["columns"] == ["country", output] and data["dims"] == ["country"]
        assert (data["timestep"], data["decision"], data["total"]) == (timestep, decision, 3)
        # Pages of one row cover every row once, in order.
        assert all_rows(client, url, query, 1) == expected
        assert all_rows(client, url, query, 2) == expected
        # CSV: the same rows, the same numbers (and for a CSV run, smif's own bytes).
        text = client.get(url, params={**query, "format": "csv"})
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
        parsed = list(csv.DictReader(io.StringIO(text.text)))
        assert [{k: r[k] for k in data["columns"]} for r in parsed] == [
            {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in row.items()}
            for row in data["rows"]
        ]
        if path.suffix == ".csv":
            assert text.content == path.read_bytes()


def test_the_last_decision_is_the_default_and_a_single_timestep_needs_none(ran, client) -> None:
    files = ran.files("energy_central")
    model, output, timestep, _ = max(files)
    last = max(d for (m, o, t, d) in files if (m, o, t) == (model, output, timestep))
    url = f"/api/v1/model_runs/energy_central/results/{model}/{output}"
    data = client.get(url, params={"timestep": timestep}).json()["data"]
    assert data["decision"] == last
    assert data["rows"] == read_exported(files[(model, output, timestep, last)])


def test_bad_names_and_parameters_are_json_errors(ran, client) -> None:
    base = "/api/v1/model_runs/energy_water_cp_cr/results"
    cases = {
        "/api/v1/model_runs/no_such_run/results/": 404,
        "/api/v1/model_runs/no_such_run/results/energy_demand/cost?timestep=2010": 404,
        f"{base}/energy_demand/no_such_output?timestep=2010": 404,
        f"{base}/no_such_model/cost?timestep=2010": 404,
        f"{base}/energy_demand/cost?timestep=1999": 404,
        f"{base}/energy_demand/cost?timestep=2010&decision=7": 404,
        f"{base}/energy_demand/cost": 400,  # three timesteps: say which
        f"{base}/energy_demand/cost?timestep=20x0": 400,
        f"{base}/energy_demand/cost?timestep=2010&format=xml": 400,
        f"{base}/energy_demand/cost?timestep=2010&limit=0": 400,
        f"{base}/energy_demand/cost?timestep=2010&cursor=bogus": 400,
    }
    for url, status in cases.items():
        response = client.get(url)
        assert response.status_code == status, (url, response.text)
        body = response.json()
        assert body["data"] is None and body["error"]["code"] == status, url
        assert body["error"]["message"], url
    unknown = client.get(f"{base}/energy_demand/no_such_output?timestep=2010").json()
    assert "energy_demand/cost" in unknown["error"]["message"]  # what there is instead
    # A cursor of another file's pages is refused, not a page of the wrong rows.
    first = client.get(f"{base}/energy_demand/cost?timestep=2010&limit=1").json()["next"]
    other = client.get(f"{base}/energy_demand/cost?timestep=2015&cursor={first}")
    assert other.status_code == 400
    assert client.post(f"{base}/").status_code == 403  # a viewer only reads


# -- in a browser --------------------------------------------------------------------------------


def dashboard_path(client: TestClient) -> str:
    """Where the dashboard is served: /dashboard/ beside smif's app, else /."""
    moved = client.get("/dashboard/")
    return "/dashboard/" if moved.status_code == 200 and "dashboard.js" in moved.text else "/"


def choose(driver: Any, css: str, *, value: str | None = None, text: str | None = None) -> None:
    """Pick an option of a select once it is there (as a person would: a change event)."""
    from selenium.webdriver.support.ui import Select

    script = (
        "const s = document.querySelector(arguments[0]);"
        "return !!s && [...s.options].some(o => arguments[1] === null ? o.text === arguments[2]"
        " : o.value === arguments[1])"
    )
    wait_for(lambda: js(driver, script, css, value, text), what=f"{css} offering {value or text}")
    select = Select(driver.find_element("css selector", css))
    if value is not None:
        select.select_by_value(value)
    else:
        select.select_by_visible_text(text)


def shown_table(driver: Any) -> list[list[str]]:
    return js(
        driver,
        "return [...document.querySelectorAll('#results-table tbody tr')].map(tr =>"
        " [...tr.children].map(td => td.dataset.value ?? td.textContent))",
    )


def test_the_dashboard_shows_and_charts_an_output_as_exported(ran, client, request, tmp_path):
    driver = request.getfixturevalue("browser")  # test_dashboard's: skips without Chromium
    path = dashboard_path(client)
    server = ApiServer(create_app(ran.dsn))
    try:
        driver.get(f"{server.url}{path}")
        wait_for(lambda: "/login" in driver.current_url, what="the login page")
        driver.find_element("name", "name").send_keys("reader")  # a viewer
        driver.find_element("name", "password").send_keys(credentials.PASSWORD)
        driver.find_element("css selector", "button[type=submit]").click()
        wait_for(lambda: "/login" not in driver.current_url, what="the dashboard")
        wait_for(
            lambda: js(driver, "return !!document.getElementById('results-toggle')"),
            what="the dashboard's Results button",
        )
        assert js(driver, "return document.getElementById('results-panel').hidden")
        driver.find_element("id", "results-toggle").click()
        wait_for(
            lambda: js(driver, "return !document.getElementById('results-panel').hidden"),
            what="the results view",
        )
        assert (
            js(
                driver,
                "return getComputedStyle(document.getElementById('workflow-placeholder')).display",
            )
            == "none"
        )

        choose(driver, "#results-run", value="energy_water_cp_cr")
        choose(driver, "#results-output", text="water_supply · water")
        choose(driver, "#results-timestep", value="2015")
        expected = read_exported(
            ran.files("energy_water_cp_cr")[("water_supply", "water", 2015, 0)]
        )

        def table() -> list[list[str]] | None:
            ready = js(
                driver,
                "const t = document.getElementById('results-table');"
                "return t.dataset.output === 'water' && t.dataset.timestep === '2015'",
            )
            return shown_table(driver) if ready else None

        shown = wait_for(table, what="the table of water_supply/water at 2015")
        assert [r[0] for r in shown] == [e["country"] for e in expected]
        assert [float(r[1]) for r in shown] == [e["water"] for e in expected]
        header = js(
            driver,
            "return [...document.querySelectorAll('#results-table th')].map(th => th.textContent)",
        )
        assert header == ["country", "water"]

        # Bars over the country dimension: one bar per row, the row's value.
        bars_script = (
            "return [...document.querySelectorAll('#results-chart svg[data-kind=bars] rect.result-bar')]"
            ".map(r => [r.dataset.label, Number(r.dataset.value), r.getBBox().height])"
        )
        bars = wait_for(lambda: js(driver, bars_script), what="the bar chart")
        assert [(b[0], b[1]) for b in bars] == [(e["country"], e["water"]) for e in expected]
        assert all(b[2] > 100 for b in bars)  # drawn from 0 to the value (0.67 of 0.8)
        driver.save_screenshot(str(tmp_path / "results-bars.png"))

        # A line over the timesteps for England.
        choose(driver, "#results-chart-kind", value="line")
        choose(driver, "#results-coord", text="England")
        files = ran.files("energy_water_cp_cr")
        series = [
            (
                t,
                next(
                    r["water"]
                    for r in read_exported(files[("water_supply", "water", t, 0)])
                    if r["country"] == "England"
                ),
            )
            for t in (2010, 2015, 2020)
        ]
        points_script = (
            "const svg = document.querySelector('#results-chart svg[data-kind=line]');"
            "if (!svg || !svg.getAttribute('aria-label').startsWith('England')) return null;"
            "return [...svg.querySelectorAll('circle.point')]"
            ".map(c => [Number(c.dataset.timestep), Number(c.dataset.value)])"
        )
        points = wait_for(lambda: js(driver, points_script), what="the line chart")
        assert [tuple(p) for p in points] == series
        assert js(driver, "return !!document.querySelector('#results-chart path.line')")
        driver.save_screenshot(str(tmp_path / "results-line.png"))

        csv_link = js(driver, "return document.getElementById('results-csv').href")
        assert "format=csv" in csv_link and "/api/v1/model_runs/energy_water_cp_cr/" in csv_link

        # Closing the view gives the rest of the dashboard back.
        driver.find_element("id", "results-close").click()
        wait_for(
            lambda: (
                js(
                    driver,
                    "return getComputedStyle(document.getElementById("
                    "'workflow-placeholder')).display",
                )
                != "none"
            ),
            what="the workflow placeholder again",
        )
        assert severe_console_errors(driver) == []
    finally:
        server.stop()
