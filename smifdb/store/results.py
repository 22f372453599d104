"""A smif model run's results, read from the blob store with smif's own readers.

smif writes one file per (model, output, timestep, decision iteration) at
``results/<run>/<model>/decision_<d>/output_<output>_timestep_<t>.<csv|parquet>``; smifdb stores
them as the run's results/ files (smifdb.store.modelruns.result_files). Their values are read
by smif's ``Store`` (no second reader of smif's formats): each model run's config and dimension
files are materialised once per process into a small folder, and each read places the one
results file it needs beside links to that folder.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from smifdb import errors, snapshot
from smifdb.store import blobs, modelruns
from smifdb.store.blobs import FileEntry

_RESULT = re.compile(
    r"results/(?P<run>[^/]+)/(?P<model>[^/]+)/decision_(?P<decision>\d+)/"
    r"output_(?P<output>.+?)_timestep_(?P<timestep>\d+)\.(?P<ext>csv|parquet)"
)
# What smif's config, metadata and data stores read or insist exist, for a model's outputs.
_CONFIG_DIRS = ("dimensions", "model_runs", "scenarios", "sector_models", "sos_models")
_DATA_DIRS = (
    "coefficients",
    "strategies",
    "initial_conditions",
    "interventions",
    "narratives",
    "scenarios",
    "parameters",
    "dimensions",
)
_INTERFACE = {"csv": "local_csv", "parquet": "local_binary"}
KEEP_PROJECTS = 32  # materialised config folders per process


class NoResults(errors.NotFound):
    """No such model run, output or timestep with results."""


class NotStored(errors.Conflict):
    """The model run's results are not in the database (a --shared-project run)."""


@dataclass(frozen=True)
class ResultFile:
    model: str
    output: str
    timestep: int
    decision: int
    ext: str
    entry: FileEntry


@dataclass(frozen=True)
class Values:
    """One results file's values as rows: its dimensions' coordinates, then the value."""

    spec: dict[str, Any]
    columns: list[str]
    rows: list[list[Any]]


def model_run(conn: psycopg.Connection, name: str, project_dir: str | None) -> modelruns.ModelRun:
    """The newest model run of this name (of this project, if given) that stores results."""
    found = modelruns.listing(conn, name=name, project_dir=project_dir, limit=1)
    if not found:
        raise NoResults(f"model run {name!r} has not been started here")
    run = modelruns.get(conn, found[0]["id"])
    if run.kind != "smif":
        raise NoResults(f"model run {name!r} is not a smif model run: it has no smif results")
    if run.options.get("shared_project", True):
        raise NotStored(
            f"model run {name!r} ran with --shared-project: its results are in "
            f"{run.project_dir}/results, not in the database"
        )
    return run


def files(conn: psycopg.Connection, run: modelruns.ModelRun) -> list[ResultFile]:
    """The run's output files as its results folder holds them now, in path order."""
    found = []
    for entry in modelruns.result_files(conn, run.id):
        m = _RESULT.fullmatch(entry.path)
        if m and m["run"] == run.name:
            found.append(
                ResultFile(
                    m["model"], m["output"], int(m["timestep"]), int(m["decision"]), m["ext"], entry
                )
            )
    return found


def output_specs(
    conn: psycopg.Connection, run: modelruns.ModelRun, models: set[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, output): smif's spec of each output of these models, as its config says
    (without coordinates); a model the snapshot has no config for is left out."""
    store = _store(_PROJECTS.folder(conn, run.id), run.options.get("interface", "local_csv"))
    specs = {}
    for model in sorted(models):
        try:
            config = store.read_model(model, skip_coords=True)
        except Exception:  # smif raises its own errors (and worse) for missing or bad config
            continue
        for output in config.get("outputs", []):
            specs[(model, output["name"])] = output
    return specs


def read_values(conn: psycopg.Connection, run: modelruns.ModelRun, found: ResultFile) -> Values:
    """The values of one results file, read by smif's store as a model would read them."""
    from smif.metadata import Spec

    project = _PROJECTS.folder(conn, run.id)
    with tempfile.TemporaryDirectory(prefix="smifdb-result-") as tmp:
        base = Path(tmp)
        for top in ("config", "data"):
            (base / top).symlink_to(project / top, target_is_directory=True)
        store = _store(base, _INTERFACE[found.ext])
        try:
            config = store.read_model(found.model, skip_coords=True)
            spec = next(o for o in config["outputs"] if o["name"] == found.output)
        except Exception as exc:  # smif's own errors, or none such
            raise NoResults(
                f"model {found.model!r} of model run {run.name!r} has no output "
                f"{found.output!r} in its configuration"
            ) from exc
        coords = {dim: store.read_dimension(dim)["elements"] for dim in spec.get("dims") or []}
        path = base / found.entry.path
        path.parent.mkdir(parents=True)
        blobs.get_file(conn, found.entry.sha256, path)
        array = store.read_results(
            run.name,
            found.model,
            Spec.from_dict({**spec, "coords": coords}),
            found.timestep,
            found.decision,
        )
    frame = array.as_df().reset_index()
    rows = [[_plain(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return Values(spec, [str(c) for c in frame.columns], rows)


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, NaN as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _store(folder: Path, interface: str) -> Any:
    from smifdb.smifrun import _store as smif_store

    return smif_store(folder, interface)


def _wanted(path: str) -> bool:
    """A snapshot file smif's stores read for a model's outputs: config and dimensions."""
    return path.startswith(("config/", "data/dimensions/")) or path in (
        "project.yml",
        "data/user-defined-units.txt",
    )


class _Projects:
    """Per process: each model run's config and dimension files in a folder of their own,
    built once (under a temporary name, renamed into place) and kept while used recently."""

    def __init__(self, keep: int = KEEP_PROJECTS) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.folders: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self.root: Path | None = None

    def folder(self, conn: psycopg.Connection, model_run_id: int) -> Path:
        entries = [e for e in blobs.model_run_files(conn, model_run_id) if _wanted(e.path)]
        key = f"{model_run_id}-{snapshot.digest(entries)}"
        with self.lock:
            if key in self.folders and self.folders[key].is_dir():
                self.folders.move_to_end(key)
                return self.folders[key]
            if self.root is None:
                self.root = Path(tempfile.mkdtemp(prefix="smifdb-api-results-"))
            building = self.root / f".{key}.{uuid.uuid4().hex}"
            try:
                for top, names in (("config", _CONFIG_DIRS), ("data", _DATA_DIRS)):
                    for name in names:
                        (building / top / name).mkdir(parents=True, exist_ok=True)
                for entry in entries:
                    path = building / blobs.check_path(entry.path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    blobs.get_file(conn, entry.sha256, path)
                target = self.root / key
                building.rename(target)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
            self.folders[key] = target
            while len(self.folders) > self.keep:
                _, old = self.folders.popitem(last=False)
                with contextlib.suppress(OSError):
                    shutil.rmtree(old)
            return target


_PROJECTS = _Projects()
