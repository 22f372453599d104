"""smif projects and their results in the blob store, so no process needs the submitter's folder.

A model run's **snapshot** is every file of the project at submission (config, data, models'
code, strategies, …) except ``results/`` and smif's own log, recorded as ``model_run_files``
rows at their project paths. Its results live in the same table under ``results/`` (warm-start
results, decision states) and as its jobs' outputs (``job_outputs``). From those, a runner
(smifdb.kinds.smif), a manager (``Mirror``) or ``smifdb modelrun export`` rebuilds the folder
smif expects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import psycopg

from smifdb import errors
from smifdb.store import blobs
from smifdb.store.blobs import FileEntry

RESULTS = "results"
# What a snapshot leaves out: smif's results and logs, and Python's caches.
SKIPPED_TOP = frozenset({RESULTS, "smif.log"})
SKIPPED_DIRS = frozenset({"__pycache__"})


class SnapshotError(errors.BadInput):
    """The project cannot be snapshotted as it is (a link out of it, an unreadable file)."""


def project_files(root: Path) -> list[str]:
    """The paths, relative to ``root``, a snapshot of the project holds, sorted.

    Symbolic links inside the project are followed (a linked folder or file is stored as what
    it holds); one leading out of the project is refused, since no runner could follow it.
    """
    root = Path(root)
    real_root = root.resolve()
    found: list[str] = []
    seen: set[Path] = set()

    def inside(path: Path, rel: str) -> Path:
        real = path.resolve()
        if not real.is_relative_to(real_root):
            raise SnapshotError(
                f"{root / rel} is a symbolic link out of the project (to {real}): a runner "
                "could not follow it; copy what it points to into the project, or submit "
                "with --shared-project"
            )
        return real

    def walk(folder: Path, prefix: str) -> None:
        real = inside(folder, prefix or ".")
        if real in seen:  # a link back to a folder walked already
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise SnapshotError(f"cannot read {folder}: {exc.strerror}") from exc
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if not prefix and entry.name in SKIPPED_TOP:
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                inside(path, rel)
            try:
                st = path.stat()
            except OSError as exc:
                raise SnapshotError(f"cannot read {path}: {exc.strerror}") from exc
            if stat.S_ISDIR(st.st_mode):
                if entry.name not in SKIPPED_DIRS:
                    walk(path, f"{rel}/")
            elif stat.S_ISREG(st.st_mode):
                found.append(rel)
            else:
                raise SnapshotError(f"{path} is not a regular file or a folder")

    walk(root, "")
    return found


def upload(conn: psycopg.Connection, root: Path) -> list[FileEntry]:
    """Store the project's files (each blob its own transaction; content stored already is
    only touched) and return the snapshot's entries."""
    return blobs.put_tree(conn, root, project_files(root), max_bytes=blobs.max_file_bytes())


def digest(entries: Iterable[FileEntry]) -> str:
    """A short name for a set of files: the same files at the same paths, the same digest."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.sha256}\0{e.mode:o}\n".encode())
    return h.hexdigest()[:16]


def split(files: Iterable[FileEntry]) -> tuple[list[FileEntry], list[FileEntry]]:
    """A model run's files as (its project snapshot, its recorded results/ files)."""
    project, results = [], []
    for entry in files:
        (results if entry.path.startswith(f"{RESULTS}/") else project).append(entry)
    return project, results


def walk_files(folder: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(path relative to ``folder``, lstat) of every regular file under it, links not followed."""
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                yield path.relative_to(folder).as_posix(), st


class Mirror:
    """A folder kept equal to a list of stored files: the manager's copy of a model run's
    project and results, downloaded file by file, each at most once while it is unchanged.

    ``sync`` makes the folder hold exactly the entries (files that are not among them are
    removed: whatever an earlier step wrote and never committed goes), and ``written`` says
    which files changed since: what a decision loop replayed in it wrote.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / "project"
        self.state_file = self.root / "state.json"
        self.placed: dict[str, tuple[str, int, int]] = {}  # path: (sha256, size, mtime_ns)

    def _load(self) -> dict[str, tuple[str, int, int]]:
        try:
            raw = json.loads(self.state_file.read_text())
            return {path: (sha, size, mtime) for path, (sha, size, mtime) in raw.items()}
        except (OSError, ValueError, TypeError):
            return {}

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.placed))
        os.replace(tmp, self.state_file)

    def sync(self, conn: psycopg.Connection, entries: Sequence[FileEntry]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        known = self._load()
        wanted = {e.path: e for e in entries}
        present = dict(walk_files(self.folder))
        for rel in present.keys() - wanted.keys():
            (self.folder / rel).unlink()
        self.placed = {}
        for rel, entry in wanted.items():
            path = self.folder / rel
            st = present.get(rel)
            record = known.get(rel)
            if st is not None and record == (entry.sha256, st.st_size, st.st_mtime_ns):
                self.placed[rel] = record
                continue
            same = st is not None and st.st_size == entry.size
            if same and blobs.hash_file(path)[0] == entry.sha256:  # the same bytes rewritten
                self.placed[rel] = (entry.sha256, st.st_size, st.st_mtime_ns)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            blobs.get_file(conn, entry.sha256, path, mode=entry.mode)
            st = path.stat()
            self.placed[rel] = (entry.sha256, st.st_size, st.st_mtime_ns)
        self._save()

    def written(self, under: str = RESULTS) -> list[tuple[str, Path, int]]:
        """Files under ``under`` that are new or whose bytes changed since ``sync``, as
        (path, file, mode) for JobFiles-style storing."""
        changed = []
        base = self.folder / under
        if not base.is_dir():
            return changed
        for rel, st in walk_files(base):
            rel = f"{under}/{rel}"
            record = self.placed.get(rel)
            if record is not None and record[1:] == (st.st_size, st.st_mtime_ns):
                continue
            path = self.folder / rel
            if record is not None and blobs.hash_file(path)[0] == record[0]:
                continue
            changed.append((rel, path, 0o755 if st.st_mode & 0o100 else 0o644))
        return sorted(changed)


def store_written(
    conn: psycopg.Connection, found: Sequence[tuple[str, Path, int]]
) -> list[FileEntry]:
    """Within the caller's transaction: store these files' blobs (savepoints of it) and return
    their entries."""
    entries = []
    for rel, path, mode in found:
        sha256, size = blobs.put_file(conn, path, max_bytes=blobs.max_file_bytes())
        entries.append(FileEntry(rel, sha256, size, mode))
    return entries


def export(conn: psycopg.Connection, entries: Sequence[FileEntry], dest: Path) -> int:
    """Write each results/ entry to ``dest`` without its ``results/`` prefix, each file
    verified and renamed into place whole. Returns the number of files written."""
    count = 0
    for entry in entries:
        rel = entry.path.removeprefix(f"{RESULTS}/")
        path = dest / blobs.check_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                raise SnapshotError(f"{path} is a folder, where the results hold a file")
        blobs.get_file(conn, entry.sha256, path, mode=entry.mode)
        count += 1
    return count


def export_outputs(
    conn: psycopg.Connection, found: Iterable[tuple[str, FileEntry]], dest: Path
) -> int:
    """Write each job's outputs (job key, entry) to ``dest/<key>/<path>``, each file verified
    and renamed into place whole. Returns the number of files written."""
    count = 0
    for key, entry in found:
        try:
            folder = blobs.check_path(key)
        except errors.BadInput:
            folder = None
        if folder != key:
            raise SnapshotError(f"job key {key!r} cannot name a folder in {dest}")
        path = dest / folder / blobs.check_path(entry.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise SnapshotError(f"{path} is a folder, where the outputs hold a file")
        blobs.get_file(conn, entry.sha256, path, mode=entry.mode)
        count += 1
    return count
