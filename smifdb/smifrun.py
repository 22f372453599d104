"""smif model runs as DAG fragments, using smif's own API (the optional ``smif`` extra).

smif's ``ModelRunner.solve_model`` walks ``DecisionManager.decision_loop()`` in one process and
runs each bundle's job graph serially. Here each bundle's graph becomes a workflow whose jobs
run ``smif before_step`` / ``smif step``; the decision module's progress never lives in a
process: its attributes are stored with each bundle (``workflows.decider_state``) and the next
bundle is decided by setting them on a freshly built module and taking one step of the loop,
reading smif's results store (which the finished bundles wrote). A module whose state is not
plain data is *replayed* from the start instead, which re-derives and rewrites the state files
of earlier bundles from the same results, so it writes what it wrote before.

Nodes of an earlier bundle and scenario nodes appear in smif's
graphs without attributes (smif 1.3 fails on them with ``KeyError: 'operation'``): they are
already satisfied and become no jobs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smifdb.decisions import (
    DeciderUnavailable,
    DecisionError,
    ModelRunError,
    NotAProject,
    UnknownModelRun,
)
from smifdb.spec import Dag, SpecError, parse

INTERFACES = ("local_csv", "local_binary")
DIMENSION_FILES = 32  # dimension files a process keeps read (smif's own cache's size)
SNAPSHOT_JOB_ATTEMPTS = 3  # attempts of each job of a snapshot run (a lost runner costs one)


def _quiet_smif() -> None:
    for name in ("smif", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _store(folder: Path, interface: str) -> Any:
    from smif.data_layer import Store
    from smif.data_layer.file import (
        CSVDataStore,
        FileMetadataStore,
        ParquetDataStore,
        YamlConfigStore,
    )

    data = CSVDataStore if interface == "local_csv" else ParquetDataStore
    return Store(
        config_store=YamlConfigStore(str(folder)),
        metadata_store=FileMetadataStore(str(folder)),
        data_store=data(str(folder)),
        model_base_folder=str(folder),
    )


def is_project(folder: str | Path) -> bool:
    """Whether ``folder`` holds a smif project's configuration (else it serves only generic
    model runs, whose decision modules live there)."""
    return (Path(folder) / "config").is_dir()


def require_smif() -> None:
    """DeciderUnavailable unless smif can be imported here."""
    try:
        import smif  # noqa: F401
    except ImportError as exc:
        raise DeciderUnavailable(
            "smif is not installed here; install the extra: "
            "PIP_CONSTRAINT=constraints/smif.txt PIP_BUILD_CONSTRAINT=constraints/smif.txt "
            'pip install "smifdb[smif]"'
        ) from exc


class SmifModelRun:
    def __init__(
        self,
        folder: Path,
        name: str,
        store: Any,
        interface: str,
        warm: bool,
        warm_start_timestep: int | None,
        in_process: bool = False,
        shared_project: bool = True,
    ) -> None:
        self.folder, self.name, self.store = folder, name, store
        self.interface, self.warm, self.warm_start_timestep = interface, warm, warm_start_timestep
        self.in_process, self.shared_project = in_process, shared_project
        self.model_run_id: int | None = None  # a snapshot run's jobs name it (set once recorded)
        self.state: Any = None  # the decision module's, after the bundle last decided

    @classmethod
    def open(
        cls,
        folder: Path,
        name: str,
        interface: str = "local_csv",
        warm: bool = False,
        warm_start_timestep: int | None = None,
        in_process: bool = False,
        shared_project: bool = True,
        check: bool = True,
    ) -> SmifModelRun:
        """Check the project and model run exist and (``check``) build; ModelRunError if not.
        (A manager re-opening a submitted run does not check: its next bundle builds anyway.)

        ``shared_project``: jobs run in ``folder`` itself, which every runner must see at that
        path; otherwise ``folder`` is a copy of the model run's snapshot (the manager's, or
        the submitter's project before it is stored) and jobs are of the ``smif`` kind."""
        require_smif()
        from smif.exception import SmifDataNotFoundError

        if in_process and not shared_project:
            raise ModelRunError(
                "--in-process runs smif inside the runners on the project folder itself: it "
                "needs --shared-project"
            )
        if interface not in INTERFACES:
            raise ModelRunError(f"unknown smif interface {interface!r}: use one of {INTERFACES}")
        if not is_project(folder):
            raise NotAProject(f"{folder} is not a smif project (no config/ folder)")
        _quiet_smif()
        _share_dimension_files()  # a manager builds the run for every bundle
        store = _store(folder, interface)
        try:
            store.read_model_run(name)
        except SmifDataNotFoundError as exc:
            try:
                known = sorted(r["name"] for r in store.read_model_runs())
            except Exception:  # an unreadable project: the main message is enough
                known = []
            hint = f"; model runs in this project: {', '.join(known)}" if known else ""
            raise UnknownModelRun(f"unknown smif model run {name!r} in {folder}{hint}") from exc
        run = cls(
            folder, name, store, interface, warm, warm_start_timestep, in_process, shared_project
        )
        if check:
            run._build()  # configuration errors surface now, not in the manager
        return run

    def _build(self) -> Any:
        from smif.controller.build import get_model_run_definition
        from smif.controller.modelrun import ModelRun

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                model_run = ModelRun.from_dict(get_model_run_definition(self.store, self.name))
        except (Exception, SystemExit) as exc:
            raise ModelRunError(
                f"smif configuration error in model run {self.name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if self.warm_start_timestep is not None:
            horizon = model_run.model_horizon
            model_run.model_horizon = horizon[horizon.index(self.warm_start_timestep) :]
        return model_run

    def prepare(self) -> dict[str, Any]:
        """Before the first bundle, as ``smif run`` does: clear old results, or for a warm
        start find the timestep to restart from. Returns the options to store with the run."""
        if self.warm:
            self.warm_start_timestep = self.store.prepare_warm_start(self.name)
        else:
            self.store.clear_results(self.name)
        return {
            "interface": self.interface,
            "warm": self.warm,
            "warm_start_timestep": self.warm_start_timestep,
            "in_process": self.in_process,
            "shared_project": self.shared_project,
        }

    def record(self, conn: Any) -> None:
        """Nothing to store: the replay wrote into the shared project folder itself."""

    def next_bundle(self, history: Sequence[dict[str, Any]]) -> Dag | None:
        """Bundle ``len(history)``. The decision module resumes from its state as it was
        after the previous bundle (``history.decider_state``, stored with that bundle by
        ``self.state``), so deciding bundle k costs the same for every k; without a stored
        state (a module whose state is not plain data, or a run from before 0014) the loop is
        replayed from the start, reaching the same state from the stored results."""
        from smif.controller.modelrun import ModelRunner
        from smif.decision.decision import DecisionManager

        wanted = len(history)
        model_run = self._build()
        self.state = None
        try:
            manager = DecisionManager(
                self.store, model_run.model_horizon, model_run.name, model_run.sos_model
            )
            module = manager._decision_module
            saved = None
            if wanted and module is not None and hasattr(history, "decider_state"):
                saved = history.decider_state(wanted - 1)
            if saved is not None:
                restore_module_state(module, saved)
                bundle = next(module)  # one step of DecisionManager.decision_loop
                if bundle is None:
                    return None
                manager._get_and_save_bundle_decisions(bundle)
            else:
                loop = manager.decision_loop()
                bundle = None
                for _ in range(wanted + 1):
                    bundle = next(loop, None)
                    if bundle is None:
                        return None
            if module is not None:
                self.state = module_state(module)
            model_run.initialised = wanted > 0  # before_model_run jobs only in bundle 0
            runner = ModelRunner(warm_start=self.warm)
            graph = runner.build_job_graph(model_run, bundle)
            if self.warm:
                done = self.store.completed_jobs(self.name)
                graph = runner.filter_job_graph(self.name, graph, done)
        except Exception as exc:
            raise DecisionError(
                f"smif decision loop failed at bundle {wanted}: {type(exc).__name__}: {exc}"
            ) from exc
        return self._dag(graph, wanted, bundle)

    def _dag(self, graph: Any, index: int, bundle: dict) -> Dag | None:
        jobs = []
        for key, node in graph.nodes(data=True):
            if "operation" not in node:
                continue  # an earlier bundle's job or a scenario: already satisfied
            operation = node["operation"].value
            model = node["model"].name
            timestep, decision = node["current_timestep"], node["decision_iteration"]
            job = {
                "key": key,
                "after": [p for p in graph.predecessors(key) if "operation" in graph.nodes[p]],
                "model": model,
                "operation": operation,
                "timestep": timestep,
                "decision": decision,
            }
            if not self.shared_project:
                assert self.model_run_id is not None
                # Each attempt has a fresh folder and stores its outputs only on success, so a
                # job whose runner was lost (or failed) runs again cleanly elsewhere.
                job["max_attempts"] = SNAPSHOT_JOB_ATTEMPTS
                job["smif"] = {
                    "model_run_id": self.model_run_id,
                    "model_run": self.name,
                    "model": model,
                    "operation": operation,
                    "timestep": timestep,
                    "decision": decision,
                    "interface": self.interface,
                }
            elif self.in_process:
                job["python"] = "smifdb.smifrun:run_job"
                job["args"] = {
                    "project": str(self.folder),
                    "model_run": self.name,
                    "model": model,
                    "timestep": timestep,
                    "decision": decision,
                    "interface": self.interface,
                }
            else:
                if operation == "before_model_run":
                    argv = ["smif", "before_step", self.name, "-m", model]
                else:
                    argv = ["smif", "step", self.name, "-m", model]
                    argv += ["-t", str(timestep), "-dn", str(decision)]
                job["command"] = [*argv, "-d", str(self.folder), "-i", self.interface]
                job["cwd"] = str(self.folder)
            jobs.append(job)
        if not jobs:  # a warm start found everything of this bundle already done
            jobs = [{"key": "nothing-to-do", "python": "smifdb.examples:noop"}]
        spec = {"name": f"{self.name} bundle {index} {_describe(bundle)}", "jobs": jobs}
        try:
            return parse(spec)
        except SpecError as exc:
            raise DecisionError(
                f"smif produced an invalid graph for bundle {index}: {exc}"
            ) from exc


# A decision module's attributes that its constructor rebuilds from the project (and that are
# not plain data): left out of its stored state.
_REBUILT = frozenset({"_register", "logger", "timesteps"})


def module_state(module: Any) -> Any:
    """A smif decision module's attributes as JSON (sets, tuples and dicts with keys that are
    not strings tagged so that they come back as they were), or None if one of them is not
    plain data: then the next bundle replays the loop instead."""
    try:
        return {
            name: _encode(value) for name, value in vars(module).items() if name not in _REBUILT
        }
    except TypeError:
        return None


def restore_module_state(module: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(module, name, _decode(value))


def _encode(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is list:
        return [_encode(v) for v in value]
    if type(value) is tuple:
        return {"tuple": [_encode(v) for v in value]}
    if type(value) in (set, frozenset):
        return {"set": sorted((_encode(v) for v in value), key=repr)}
    if type(value) is dict:
        if all(type(k) is str for k in value):
            return {"dict": {k: _encode(v) for k, v in value.items()}}
        return {"items": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise TypeError(f"not plain data: {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "tuple":
        return tuple(_decode(v) for v in inner)
    if tag == "set":
        return {_decode(v) for v in inner}
    if tag == "dict":
        return {k: _decode(v) for k, v in inner.items()}
    return {_decode(k): _decode(v) for k, v in inner}


def run_job(
    project: str,
    model_run: str,
    model: str,
    timestep: int | None,
    decision: int | None,
    interface: str = "local_csv",
) -> None:
    """One smif job inside the runner process (``--in-process``): what `smif step` does,
    without starting Python and importing smif for every job."""
    from smif.controller.execute_step import execute_model_before_step, execute_model_step

    _quiet_smif()
    store = _store(Path(project), interface)
    if timestep is None:
        execute_model_before_step(model_run, model, store)
    else:
        execute_model_step(model_run, model, timestep, decision, store)


def warm_up(project: str, model_run: str, interface: str = "local_csv") -> None:
    """What a model run's zygote does once, so that each job forked from it starts where a
    `smif run` process is after its first job: the model run's models configured (their
    dimensions read, which is half of a sample job's work) and imported (with what they
    import), and xarray's search for optional array libraries done."""
    import xarray
    from smif.data_layer.model_loader import ModelLoader

    _quiet_smif()
    _share_dimension_files()
    store = _store(Path(project), interface)
    run = store.read_model_run(model_run)
    for name in store.read_sos_model(run["sos_model"])["sector_models"]:
        config = store.read_model(name)
        config["path"] = os.path.normpath(os.path.join(store.model_base_folder, config["path"]))
        ModelLoader().load(config)
    xarray.DataArray([0.0], dims=["x"], coords={"x": [0]}).reindex(x=[0])


def _share_dimension_files() -> None:
    """smif caches a dimension file per metadata store (an lru_cache on the method, keyed by
    the store), and every job makes a new store: here the cache is keyed by the file itself
    (its real path, inode, size and modification time), so jobs forked from a zygote find
    the dimensions it read. A job still gets what smif's own cache would give it: the
    elements read from that file (one object for all its readers, as there)."""
    from smif.data_layer.file.file_metadata_store import FileMetadataStore

    read = getattr(FileMetadataStore._read_dimension_file, "__wrapped__", None)
    if read is None:  # shared already, or not the smif this was written for
        return
    cache: OrderedDict[tuple, Any] = OrderedDict()  # at most DIMENSION_FILES, as smif's

    def read_dimension_file(self: Any, filename: str) -> Any:
        path = os.path.join(self.data_folder, filename)
        try:
            st = os.stat(path)
        except OSError:
            return read(self, filename)  # smif's own error
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        elements = cache[key] = read(self, filename)
        if len(cache) > DIMENSION_FILES:
            cache.popitem(last=False)
        return elements

    read_dimension_file.cache_clear = cache.clear  # type: ignore[attr-defined]
    FileMetadataStore._read_dimension_file = read_dimension_file


def _describe(bundle: dict) -> str:
    iterations = ",".join(map(str, bundle["decision_iterations"]))
    timesteps = ",".join(map(str, bundle["timesteps"]))
    return f"(decisions {iterations}; timesteps {timesteps})"
