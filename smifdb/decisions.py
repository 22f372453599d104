"""Deciders: what a model run asks, between bundles, for the next DAG fragment.

A decider is rebuilt from a model run's row every time it is asked (the manager keeps nothing in
memory), and is given the finished bundles' history from the tables. Two kinds:

- ``python``: a user entry point ``module:function(history) -> DAG spec | None``;
- ``smif``: a smif project's decision loop, replayed over the finished bundles
  (see ``smifdb.smifrun``): in the project folder itself (``--shared-project``), or, by
  default, in the manager's mirror of the model run's snapshot and stored results
  (``SnapshotDecider``), whose decision-state files it then stores.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg

from smifdb import errors, snapshot
from smifdb.spec import PYTHON_TARGET, Dag, SpecError, parse, with_base_dir
from smifdb.store import blobs, modelruns
from smifdb.store.modelruns import ModelRun


class ModelRunError(errors.BadInput, ValueError):
    """A model run that cannot start: bad project, unknown run, bad configuration."""


class UnknownModelRun(errors.NotFound, ModelRunError):
    """The project has no model run of that name."""


class NotAProject(ModelRunError):
    """The folder is missing, or not a smif project: nothing about any one model run."""


class DeciderUnavailable(ModelRunError):
    """This process lacks what the decider needs (the smif extra); another process may not."""


class DecisionError(errors.BadInput, RuntimeError):
    """The decision module raised, or returned something that is not a valid DAG."""


class Decider(Protocol):
    state: Any  # JSON stored with the bundle just decided, given back (history.decider_state)

    def next_bundle(self, history: Sequence[dict[str, Any]]) -> Dag | None:
        """The DAG of bundle ``len(history)``, or None when the decision loop has ended.
        ``history``: smifdb.store.modelruns.History, read lazily."""

    def record(self, conn: psycopg.Connection) -> None:
        """Within the transaction that submits the bundle (or ends the run): store what
        deciding wrote that later steps read."""


def project_dir(path: str | Path) -> Path:
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise NotAProject(f"project directory {path} does not exist")
    return folder


class PythonDecider:
    """Calls ``module:function(history)``; the project directory is importable and is the
    default working folder of command jobs."""

    def __init__(self, entry: str, folder: Path, name: str) -> None:
        if not PYTHON_TARGET.match(entry):
            raise ModelRunError(f"decision entry point {entry!r} must look like module:function")
        self.entry, self.folder, self.name = entry, folder, name
        self.function = self._load()
        self.state = None  # the function's own progress is its to keep, in its history

    def _load(self) -> Any:
        module_name, _, attr = self.entry.partition(":")
        if str(self.folder) not in sys.path:
            sys.path.insert(0, str(self.folder))
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ModelRunError(f"cannot load decision entry point {self.entry!r}: {exc}") from exc
        if not callable(obj):
            raise ModelRunError(f"decision entry point {self.entry!r} is not callable")
        return obj

    def record(self, conn: psycopg.Connection) -> None:
        pass

    def next_bundle(self, history: Sequence[dict[str, Any]]) -> Dag | None:
        bundle = len(history)
        try:
            spec = self.function(history)
        except Exception as exc:
            raise DecisionError(
                f"{self.entry} raised {type(exc).__name__}: {exc} (deciding bundle {bundle})"
            ) from exc
        if spec is None:
            return None
        try:
            dag = parse(spec, name=f"{self.name} bundle {bundle}")
        except SpecError as exc:
            raise DecisionError(
                f"{self.entry} returned an invalid DAG for bundle {bundle}: {exc}"
            ) from exc
        return with_base_dir(dag, self.folder)


def mirror_root(model_run_id: int) -> Path:
    """Where this machine's managers keep their copy of a snapshot model run's folder."""
    from smifdb.pgserver import default_home

    return default_home() / "manager" / f"model-run-{model_run_id}"


class SnapshotDecider:
    """A smif decision loop replayed in the manager's mirror of a model run: its snapshot and
    its stored results, refreshed from the store before every step, so it needs no project
    folder. The decision-state files the replay writes are stored with the model run (an
    upsert: a replay writes the same bytes again)."""

    def __init__(self, conn: psycopg.Connection, model_run: ModelRun) -> None:
        self.model_run = model_run
        self.state = None
        self.mirror = snapshot.Mirror(mirror_root(model_run.id))
        project, _ = snapshot.split(blobs.model_run_files(conn, model_run.id))
        if not project:
            raise ModelRunError(f"model run {model_run.id} has no stored project snapshot")
        from smifdb.smifrun import SmifModelRun, require_smif  # smif is an optional extra

        require_smif()  # before downloading anything
        outputs = modelruns.result_files(conn, model_run.id, jobs_only=True)
        self.job_outputs = {e.path for e in outputs}
        self.mirror.sync(conn, [*project, *modelruns.result_files(conn, model_run.id)])
        self.run = SmifModelRun.open(
            self.mirror.folder, model_run.name, **model_run.options, check=False
        )
        self.run.model_run_id = model_run.id

    def prepare(self) -> dict[str, Any]:
        return self.run.prepare()

    def next_bundle(self, history: Sequence[dict[str, Any]]) -> Dag | None:
        dag = self.run.next_bundle(history)
        self.state = self.run.state
        return dag

    def record(self, conn: psycopg.Connection) -> None:
        found = [f for f in self.mirror.written() if f[0] not in self.job_outputs]
        if found:
            entries = snapshot.store_written(conn, found)
            blobs.add_model_run_files(conn, self.model_run.id, entries, replace=True)


def decider_for(model_run: ModelRun, conn: psycopg.Connection) -> Decider:
    """Rebuild a model run's decider from its row (and, for a snapshot run, the store)."""
    if model_run.kind == "smif" and not model_run.options.get("shared_project", True):
        return SnapshotDecider(conn, model_run)
    folder = project_dir(model_run.project_dir)
    if model_run.kind == "python":
        assert model_run.decide is not None
        return PythonDecider(model_run.decide, folder, model_run.name)
    from smifdb.smifrun import SmifModelRun  # smif is an optional extra

    return SmifModelRun.open(folder, model_run.name, **model_run.options, check=False)
