"""A runner's data plane: job files between the blob store and the machine it runs on.

Kinds (smifdb.kinds) see only JobFiles: fetch stored files into the runner's cache and link
them into an attempt's folder, store an attempt's outputs, and read what a job's folder holds.
Where the files come from is a ``Source``: ``DirectData`` (a small pool of data connections
opened on demand and closed when idle, apart from the runner's claim and heartbeat
connections: a runner whose jobs have no files opens none), or, for a runner that reaches
only the API, smifdb.transport.http.HttpData.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from smifdb import db
from smifdb.cache import Cache
from smifdb.store import blobs, jobfiles
from smifdb.store.blobs import FileEntry

T = TypeVar("T")
MAX_DATA_CONNECTIONS = 4
IDLE_SECONDS = 60.0


class Source(Protocol):
    def job_inputs(
        self, workflow_id: int, *, files: bool, inputs: Sequence[str]
    ) -> list[tuple[str, FileEntry]]: ...

    def model_run_inputs(self, model_run_id: int) -> tuple[list[FileEntry], list[FileEntry]]:
        """A smif model run's project snapshot and stored results."""

    def missing(self, shas: Sequence[str]) -> set[str]: ...

    def download(self, sha256: str, dest: Path, mode: int) -> None: ...

    def upload(self, path: Path, sha256: str, size: int) -> None: ...

    def close(self) -> None: ...


class DirectData:
    """Files straight from PostgreSQL, on data connections of their own."""

    def __init__(
        self,
        dsn: str,
        *,
        connections: int = MAX_DATA_CONNECTIONS,
        max_file_bytes: int = blobs.DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.dsn, self.max_file_bytes = dsn, max_file_bytes
        self._size = max(1, connections)
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()

    def _connections(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn,
                    min_size=0,
                    max_size=self._size,
                    max_idle=IDLE_SECONDS,
                    # No prepared statements: a transaction-pooling PgBouncer may serve them.
                    kwargs={
                        "autocommit": True,
                        "application_name": "smifdb runner data",
                        "prepare_threshold": None,
                    },
                    open=True,
                    name="smifdb-data",
                )
            return self._pool

    def with_conn(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """``fn(conn)`` on a data connection; a lost connection is retried once on another."""
        for attempt in (1, 2):
            try:
                with self._connections().connection(timeout=60) as conn:
                    return fn(conn)
            except db.DB_ERRORS:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def job_inputs(
        self, workflow_id: int, *, files: bool, inputs: Sequence[str]
    ) -> list[tuple[str, FileEntry]]:
        return self.with_conn(
            lambda conn: jobfiles.job_inputs(conn, workflow_id, files=files, inputs=inputs)
        )

    def model_run_inputs(self, model_run_id: int) -> tuple[list[FileEntry], list[FileEntry]]:
        return self.with_conn(lambda conn: jobfiles.model_run_inputs(conn, model_run_id))

    def missing(self, shas: Sequence[str]) -> set[str]:
        return self.with_conn(lambda conn: blobs.missing(conn, shas))

    def download(self, sha256: str, dest: Path, mode: int) -> None:
        self.with_conn(lambda conn: blobs.get_file(conn, sha256, dest, mode=mode))

    def upload(self, path: Path, sha256: str, size: int) -> None:
        self.with_conn(
            lambda conn: blobs.put_file(conn, path, max_bytes=self.max_file_bytes, sha256=sha256)
        )

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


class JobFiles:
    """What every attempt with files shares on one runner: the cache, the folder attempts run
    in, the size limit of one output file, and where files come from."""

    def __init__(
        self,
        source: Source | str,
        cache: Cache,
        work_root: Path,
        *,
        max_file_bytes: int = blobs.DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        if isinstance(source, str):  # a DSN
            source = DirectData(source, max_file_bytes=max_file_bytes)
        self.source, self.cache, self.work_root = source, cache, Path(work_root)
        self.max_file_bytes = max_file_bytes

    def close(self) -> None:
        self.source.close()

    # -- inputs -----------------------------------------------------------------------------

    def job_inputs(
        self, workflow_id: int, *, files: bool, inputs: Sequence[str]
    ) -> list[tuple[str, FileEntry]]:
        return self.source.job_inputs(workflow_id, files=files, inputs=inputs)

    def model_run_inputs(self, model_run_id: int) -> tuple[list[FileEntry], list[FileEntry]]:
        return self.source.model_run_inputs(model_run_id)

    def fetch(self, entries: Iterable[FileEntry]) -> None:
        """Every entry in the cache, each blob downloaded at most once per machine."""
        with self.holding(entries):
            pass

    def holding(self, entries: Iterable[FileEntry]) -> contextlib.AbstractContextManager[None]:
        """``fetch``, and keep this runner's cache evictions off them until the block ends."""
        return self.cache.holding(entries, self.source.download)

    def materialise(self, placed: Sequence[tuple[str, FileEntry]], folder: Path) -> None:
        """Fetch (folder under ``folder``, file) pairs and link them into place."""
        with self.holding(entry for _, entry in placed):
            for under, entry in placed:
                self.cache.materialise([entry], folder, under)

    # -- outputs ----------------------------------------------------------------------------

    def store(self, found: Sequence[tuple[str, Path, int]]) -> list[dict[str, Any]]:
        """Upload files (relative path, file, mode) that the store lacks; their entries, as an
        Outcome's ``outputs``. Each blob is its own short transaction, committed before the
        outcome that references it is recorded."""
        hashed = []
        for rel, path, mode in found:
            sha256, size = blobs.hash_file(path)
            if size > self.max_file_bytes:
                raise blobs.FileTooLarge(
                    f"output {rel} is {size} bytes, more than the runner's --max-file-bytes "
                    f"({self.max_file_bytes})"
                )
            hashed.append((rel, path, mode, sha256, size))
        absent = self.source.missing([h[3] for h in hashed]) if hashed else set()
        stored: set[str] = set()
        for _rel, path, _mode, sha256, size in hashed:
            if sha256 in absent and sha256 not in stored:
                self.source.upload(path, sha256, size)
                stored.add(sha256)
        return [
            {"path": rel, "sha256": sha256, "size": size, "mode": mode}
            for rel, _path, mode, sha256, size in hashed
        ]
