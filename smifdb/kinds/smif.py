"""``smif`` jobs: one ``smif before_step`` / ``smif step`` of a snapshot model run, on a runner
that needs nothing of the submitter's folder.

``prepare`` materialises the model run's snapshot once per machine into the runner's cache
(``CACHE/projects/<model run>-<digest>/``, built beside and renamed into place whole; held
against the cache's eviction until the attempt ends, see smifdb.cache), then makes the
attempt's own folder: its top-level entries (config, data, models, …) are symbolic
links into that copy, and its ``results/`` holds every stored result of the model run so far.
Results in the folder this job writes (its model and decision iteration) are copies; the others
are hard links into the cache, which the job only reads. Every placed file carries the cache's
pristine mtime, so ``collect`` finds the job's outputs without a record of its own: the files
under ``results/`` that are new or were written. ``run`` is ``smif`` as a subprocess, with
everything a command job has (smifdb.execute.run_process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from smifdb import snapshot, workspace
from smifdb.cache import PRISTINE_MTIME_NS, CacheError
from smifdb.execute import Attempt, run_in_worker, run_process
from smifdb.store.blobs import FileEntry
from smifdb.store.queue import Outcome

INTERFACES = ("local_csv", "local_binary")
OPERATIONS = ("before_model_run", "simulate")
_INT_FIELDS = ("timestep", "decision")

SMIF_STEP = "smifdb.smifrun:run_job"  # what `smif step` and `smif before_step` do
SMIF_WARM_UP = "smifdb.smifrun:warm_up"  # what a model run's zygote does once


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Smif:
    name = "smif"
    spec_fields = frozenset({"smif"})
    spec_schema: ClassVar[dict[str, Any]] = {
        "smif": {
            "type": "object",
            "required": ["model_run_id", "model_run", "model", "operation"],
            "properties": {
                "model_run_id": {"type": "integer", "minimum": 1},
                "model_run": {"type": "string", "minLength": 1},
                "model": {"type": "string", "minLength": 1},
                "operation": {"enum": list(OPERATIONS)},
                "timestep": {"type": ["integer", "null"]},
                "decision": {"type": ["integer", "null"]},
                "interface": {"enum": list(INTERFACES)},
            },
        }
    }

    def parse(self, raw: Mapping[str, Any], where: str, problems: list[str]) -> dict | None:
        start = len(problems)
        given = raw["smif"]
        if not isinstance(given, Mapping):
            problems.append(f"{where}: 'smif' must be a mapping (model_run_id, model, …)")
            return None
        unknown = sorted(set(given) - set(self.spec_schema["smif"]["properties"]))
        if unknown:
            problems.append(f"{where}: unknown 'smif' field(s) {', '.join(map(str, unknown))}")
        run_id = given.get("model_run_id")
        if not _is_int(run_id) or run_id < 1:
            problems.append(f"{where}: 'smif.model_run_id' must be a model run's id")
        for name in ("model_run", "model"):
            if not isinstance(given.get(name), str) or not given[name]:
                problems.append(f"{where}: 'smif.{name}' must be a non-empty string")
        operation = given.get("operation")
        if operation not in OPERATIONS:
            problems.append(f"{where}: 'smif.operation' must be one of {', '.join(OPERATIONS)}")
        for name in _INT_FIELDS:
            if given.get(name) is not None and not _is_int(given[name]):
                problems.append(f"{where}: 'smif.{name}' must be an integer")
        if operation == "simulate" and given.get("timestep") is None:
            problems.append(f"{where}: a smif simulate job needs 'smif.timestep'")
        interface = given.get("interface", "local_csv")
        if interface not in INTERFACES:
            problems.append(f"{where}: 'smif.interface' must be one of {', '.join(INTERFACES)}")
        if len(problems) > start:
            return None
        return {
            "model_run_id": run_id,
            "model_run": given["model_run"],
            "model": given["model"],
            "operation": operation,
            "timestep": given.get("timestep"),
            "decision": given.get("decision"),
            "interface": interface,
        }

    def with_base_dir(self, payload: dict[str, Any], base: Path) -> dict[str, Any]:
        return payload  # the project comes from the store, never from a folder

    # -- on a runner ------------------------------------------------------------------------

    def folder(self, attempt: Attempt) -> Path:
        job = attempt.job
        return attempt.files.work_root / f"smif-{job.id}.{job.attempt}"

    def prepare(self, attempt: Attempt) -> None:
        payload, files = attempt.job.payload, attempt.files
        run_id = payload["model_run_id"]

        project, results = files.model_run_inputs(run_id)
        if not project:
            raise RuntimeError(f"model run {run_id} has no stored project snapshot")
        source = self._project(attempt, run_id, project)
        folder = workspace.fresh_folder(files.work_root, self.folder(attempt).name)
        attempt.folder = folder  # removed after the attempt, whatever its end
        for top in sorted({e.path.split("/", 1)[0] for e in project}):
            os.symlink(source / top, folder / top)
        own = _own_folder(payload)
        with files.holding(results):  # not evicted before they are placed
            for entry in results:
                dest = folder / entry.path
                if entry.path.startswith(own):  # this job may write it: never a link
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(files.cache.path(entry), dest)
                    os.chmod(dest, entry.mode)
                else:
                    files.cache.materialise([entry], folder)
                _pristine(dest)
        (folder / snapshot.RESULTS).mkdir(exist_ok=True)

    def _project(self, attempt: Attempt, run_id: int, project: list[FileEntry]) -> Path:
        """The snapshot's folder in the cache, made now if it is absent or was written to, and
        held (against the cache's eviction) until the attempt ends."""
        cache = attempt.files.cache
        final = cache.folders / f"{run_id}-{snapshot.digest(project)}"
        for _ in range(5):  # another slot's eviction may take a folder between two looks
            fd = cache.use_folder(final)
            if fd is not None:
                if _intact(final, project):
                    attempt.held.callback(os.close, fd)
                    return final
                os.close(fd)
                if not cache.remove_folder(final):  # written to, and in use: a copy of its own
                    final = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}")
            fd = self._build(attempt, final, project)
            if fd is not None:
                attempt.held.callback(os.close, fd)
                return final
        raise CacheError(
            f"the project of model run {run_id} was evicted from the runner's cache "
            f"{cache.root} as soon as it was made: raise --cache-max-bytes"
        )

    def _build(self, attempt: Attempt, final: Path, project: list[FileEntry]) -> int | None:
        """Materialise ``final`` beside it and rename it into place, held; None if another slot
        (or runner) made it first."""
        files = attempt.files
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        building = root / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
        fd = None
        try:
            with files.holding(project):
                building.mkdir()
                files.cache.materialise(project, building)
            for entry in project:
                _pristine(building / entry.path)
            fd = files.cache.lock_new_folder(building)
            try:
                building.rename(final)
            except OSError:  # theirs is as good
                if not final.is_dir():
                    raise
                os.close(fd)
                return None
            return fd
        except BaseException:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        finally:
            workspace.remove(building)

    def run(self, attempt: Attempt) -> Outcome:
        payload = attempt.job.payload
        folder = self.folder(attempt)
        name, model = payload["model_run"], payload["model"]
        if payload["operation"] == "before_model_run":
            argv = ["smif", "before_step", name, "-m", model]
        else:
            argv = ["smif", "step", name, "-m", model]
            argv += ["-t", str(payload["timestep"]), "-dn", str(payload["decision"])]
        argv += ["-d", str(folder), "-i", payload["interface"]]
        # No bytecode written beside the models' code: that folder is the cache's.
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        if attempt.policy.workers is None or attempt.policy.smif_processes:
            return run_process(attempt, argv, cwd=str(folder), env=env)
        # What `smif step` does, in a new worker forked from the runner's zygote (smif
        # imported there once): no second of imports per job, still a process of its own.
        args = {
            "project": str(folder),
            "model_run": name,
            "model": model,
            "timestep": payload.get("timestep")
            if payload["operation"] != "before_model_run"
            else None,
            "decision": payload.get("decision"),
            "interface": payload["interface"],
        }
        # Forked from a zygote that has read this model run's project once (its dimensions,
        # its models' imports), as one `smif run` process would have for all its jobs.
        project = str(self._project_folder(attempt))
        warm_args = {"project": project, "model_run": name, "interface": payload["interface"]}
        warm = ((project, name, payload["interface"]), SMIF_WARM_UP, warm_args)
        return run_in_worker(attempt, SMIF_STEP, args, cwd=str(folder), env=env, warm=warm)

    def _project_folder(self, attempt: Attempt) -> Path:
        """The cache's copy of the project, which the attempt's folder links into."""
        return Path(os.path.realpath(self.folder(attempt) / "config")).parent

    def stop(self, attempt: Attempt, reason: str) -> bool:
        attempt.stop(reason)  # SIGTERM to its process group, SIGKILL after a grace
        worker = attempt.worker
        if worker is not None:  # a warm worker instead: killed
            worker.kill()
        return True

    def collect(self, attempt: Attempt, outcome: Outcome) -> Outcome:
        """The files under results/ that the job wrote (new, or not pristine any more)."""
        folder = self.folder(attempt)
        found = []
        for rel, st in snapshot.walk_files(folder / snapshot.RESULTS):
            if st.st_mtime_ns != PRISTINE_MTIME_NS:
                path = folder / snapshot.RESULTS / rel
                mode = 0o755 if st.st_mode & 0o100 else 0o644
                found.append((f"{snapshot.RESULTS}/{rel}", path, mode))
        outputs = attempt.files.store(sorted(found))
        return replace(outcome, outputs=outputs)


def _own_folder(payload: Mapping[str, Any]) -> str:
    """Where smif writes this job's results: results/<run>/<model>/decision_<iteration>/."""
    decision = payload["decision"]
    iteration = "none" if decision is None else decision
    return f"{snapshot.RESULTS}/{payload['model_run']}/{payload['model']}/decision_{iteration}/"


def _pristine(path: Path) -> None:
    """Give a copy the cache's fixed mtime (a hard link has it already: its access time, the
    cache's LRU clock, is left alone), so that a job's write shows."""
    if path.stat().st_mtime_ns != PRISTINE_MTIME_NS:
        os.utime(path, ns=(time.time_ns(), PRISTINE_MTIME_NS))


def _intact(folder: Path, project: list[FileEntry]) -> bool:
    """Does the cached project still hold every file as stored (no job wrote to it)?"""
    for entry in project:
        try:
            st = (folder / entry.path).stat()
        except OSError:
            return False
        if st.st_size != entry.size or st.st_mtime_ns != PRISTINE_MTIME_NS:
            return False
    return True


def _remove_abandoned(root: Path) -> None:
    """Folders a killed runner was building (its pid is gone) or was setting aside."""
    for path in root.glob(".build-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            workspace.remove(path)
    for path in root.glob(".stale-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            workspace.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


KIND = Smif()
