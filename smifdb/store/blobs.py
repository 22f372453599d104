"""The blob store: files stored once by SHA-256, in chunks, and the records that name them.

A blob is a ``blobs`` row (sha256, size, chunks) and its ``blob_chunks`` rows (≤ CHUNK_BYTES
each, COPYed in binary). A writer inserts both in one transaction, so a blob is visible only
when complete: a writer killed mid-upload leaves nothing. Two writers of the same content meet
on the primary key: the second waits for the first, then skips. Files are streamed both ways
(never a whole file in memory) and every read is checked against the hash: stored data that
fails it raises BlobCorrupt, never silently wrong bytes.

Records name blobs by relative path (``workflow_files``, ``job_outputs``, ``model_run_files``);
their foreign keys make a referenced blob impossible to delete. ``prune_blobs`` deletes blobs
that nothing names and nobody used within a grace period: every upload and every dedup hit
(``missing``) bumps ``last_used_at``, so a blob is safe between its upload and the commit of
the record that names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from smifdb import errors

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_FILE_BYTES = 4 << 30  # env SMIFDB_MAX_FILE_BYTES overrides where a CLI reads it
MAX_FILE_BYTES_ENV = "SMIFDB_MAX_FILE_BYTES"
READ_AHEAD = 4  # chunks fetched per query by read_chunks: bounded memory, short statements
PRUNE_MAX_CHUNKS = 50_000  # chunks deleted per prune transaction, at most (≈ 50 GiB)
MODES = (0o644, 0o755)  # only the executable bit is kept

_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True)
class FileEntry:
    """A path in a record and the blob it names."""

    path: str
    sha256: str  # 64 hex characters
    size: int
    mode: int = 0o644


class BlobCorrupt(errors.Error):
    """Stored data failed its hash or lost a chunk: an outage, never the caller's input."""

    status = 500


class BlobMissing(errors.NotFound):
    pass


class FileTooLarge(errors.TooLarge):
    pass


class FileChanged(errors.Conflict):
    """The file changed while it was uploaded: nothing of it was stored."""


# -- statements -------------------------------------------------------------------------

# DO NOTHING: a concurrent writer of the same content holds the key until it commits (we
# wait, then skip) or rolls back (we insert). RETURNING nothing means it is stored already.
INSERT_BLOB = """
INSERT INTO blobs (sha256, size, chunks) VALUES (%s, %s, %s)
ON CONFLICT (sha256) DO NOTHING
RETURNING 1
"""
TOUCH_BLOBS = "UPDATE blobs SET last_used_at = now() WHERE sha256 = ANY(%s) RETURNING sha256"
COPY_CHUNKS = "COPY blob_chunks (sha256, seq, data) FROM STDIN (FORMAT BINARY)"
BLOB = "SELECT size, chunks FROM blobs WHERE sha256 = %s"
READ_CHUNKS = """
SELECT seq, data FROM blob_chunks WHERE sha256 = %s AND seq >= %s ORDER BY seq LIMIT %s
"""

_ADD_FILES = """
INSERT INTO {table} ({owner}, path, sha256, size, mode)
SELECT %(owner)s, * FROM unnest(%(paths)s::text[], %(shas)s::bytea[], %(sizes)s::bigint[],
                               %(modes)s::int[])
"""
ADD_WORKFLOW_FILES = _ADD_FILES.format(table="workflow_files", owner="workflow_id")
ADD_MODEL_RUN_FILES = _ADD_FILES.format(table="model_run_files", owner="model_run_id")
REPLACE_MODEL_RUN_FILES = (
    ADD_MODEL_RUN_FILES
    + """ON CONFLICT (model_run_id, path) DO UPDATE
    SET sha256 = excluded.sha256, size = excluded.size, mode = excluded.mode
"""
)
WORKFLOW_FILES = (
    "SELECT path, sha256, size, mode FROM workflow_files WHERE workflow_id = %s ORDER BY path"
)
MODEL_RUN_FILES = """
SELECT path, sha256, size, mode FROM model_run_files
WHERE model_run_id = %(id)s AND (%(prefix)s::text IS NULL OR starts_with(path, %(prefix)s))
ORDER BY path
"""
JOB_OUTPUTS = """
SELECT job_id, path, sha256, size, mode FROM job_outputs
WHERE job_id = ANY(%s::bigint[]) ORDER BY job_id, path
"""

# Blobs nothing names and nobody used within the grace period. Each NOT EXISTS is a probe of
# the reference table's sha256 index.
_UNREFERENCED = """
FROM blobs b
WHERE b.last_used_at < now() - %(grace)s::interval
  AND NOT EXISTS (SELECT 1 FROM workflow_files r WHERE r.sha256 = b.sha256)
  AND NOT EXISTS (SELECT 1 FROM job_outputs r WHERE r.sha256 = b.sha256)
  AND NOT EXISTS (SELECT 1 FROM model_run_files r WHERE r.sha256 = b.sha256)
  AND NOT EXISTS (SELECT 1 FROM dafni_dataset_files r WHERE r.sha256 = b.sha256)
  AND NOT EXISTS (SELECT 1 FROM dafni_dataset_upload_files r WHERE r.sha256 = b.sha256)
"""
COUNT_UNREFERENCED = "SELECT count(*), coalesce(sum(b.size), 0)::bigint " + _UNREFERENCED
# SKIP LOCKED: a blob being touched (missing) or referenced (the FK's KEY SHARE lock) is
# skipped, and a prune never waits.
LOCK_UNREFERENCED = (
    "SELECT b.sha256, b.size, b.chunks "
    + _UNREFERENCED
    + "ORDER BY b.last_used_at LIMIT %(limit)s FOR UPDATE OF b SKIP LOCKED"
)
DELETE_CHUNKS = "DELETE FROM blob_chunks WHERE sha256 = ANY(%s)"
DELETE_BLOBS = "DELETE FROM blobs WHERE sha256 = ANY(%s)"

# The binary COPY format, written by hand: no per-row formatting of a 1 MiB value in Python.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_ROW = struct.Struct("!hi32siii")  # 3 fields: sha256 (32), seq (int4), data length
_COPY_TRAILER = struct.pack("!h", -1)


# -- validation -------------------------------------------------------------------------


def check_path(path: str) -> str:
    """A relative POSIX path inside its folder, normalised ('a/./b/' is 'a/b'); BadInput else."""
    if not isinstance(path, str) or not path:
        raise errors.BadInput(f"file path {path!r} is empty: give a path relative to its folder")
    if "\x00" in path:
        raise errors.BadInput(f"file path {path!r} contains a NUL character")
    if path.startswith("/"):
        raise errors.BadInput(f"file path {path!r} is absolute: give a path relative to its folder")
    if ".." in path.split("/"):
        raise errors.BadInput(f"file path {path!r} has a '..' component: it could leave its folder")
    normal = posixpath.normpath(path)
    if normal == ".":
        raise errors.BadInput(f"file path {path!r} names no file")
    return normal


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def check_sha256(sha256: str) -> bytes:
    """The 32 bytes of a sha256 given as 64 lowercase hex characters; BadInput else."""
    if not isinstance(sha256, str) or not _HEX.fullmatch(sha256):
        raise errors.BadInput(f"{sha256!r} is not a sha256: 64 lowercase hex characters")
    return bytes.fromhex(sha256)


def max_file_bytes(default: int = DEFAULT_MAX_FILE_BYTES) -> int:
    """The per-file limit: $SMIFDB_MAX_FILE_BYTES if set (a whole number of bytes)."""
    text = os.environ.get(MAX_FILE_BYTES_ENV, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise errors.BadInput(f"{MAX_FILE_BYTES_ENV}={text!r} is not a whole number of bytes")
    return value


def _too_large(name: object, size: int, limit: int) -> FileTooLarge:
    return FileTooLarge(
        f"{name} is {size:,} bytes, over the limit of {limit:,} bytes per file "
        f"(raise it with {MAX_FILE_BYTES_ENV})"
    )


def _entries(entries: Iterable[FileEntry]) -> dict[str, list]:
    """Validated entries as the arrays of _ADD_FILES; BadInput names the first bad one."""
    paths, shas, sizes, modes, seen = [], [], [], [], set()
    for entry in entries:
        path = check_path(entry.path)
        if path in seen:
            raise errors.BadInput(f"file path {path!r} is given twice")
        if entry.mode not in MODES:
            raise errors.BadInput(f"{path}: mode {entry.mode:#o} is neither 0o644 nor 0o755")
        if not isinstance(entry.size, int) or entry.size < 0:
            raise errors.BadInput(f"{path}: size {entry.size!r} is not a byte count")
        seen.add(path)
        paths.append(path)
        shas.append(check_sha256(entry.sha256))
        sizes.append(entry.size)
        modes.append(entry.mode)
    return {"paths": paths, "shas": shas, "sizes": sizes, "modes": modes}


def _entry(path: str, sha256: bytes, size: int, mode: int) -> FileEntry:
    return FileEntry(path, bytes(sha256).hex(), size, mode)


# -- writing ----------------------------------------------------------------------------


def hash_file(path: Path) -> tuple[str, int]:
    """The file's sha256 (hex) and size, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def missing(conn: psycopg.Connection, shas: Iterable[str]) -> set[str]:
    """Which of these blobs are not stored. Bumps the others' last_used_at, so that prune's
    grace covers a dedup hit until a record names it (a blob a prune holds counts as missing:
    the touch waits for it, then finds it gone)."""
    wanted = {sha: check_sha256(sha) for sha in shas}
    if not wanted:
        return set()
    present = {bytes(r[0]).hex() for r in conn.execute(TOUCH_BLOBS, [sorted(wanted.values())])}
    return set(wanted) - present


def put_file(
    conn: psycopg.Connection,
    path: Path,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    sha256: str | None = None,
) -> tuple[str, int]:
    """Store a file (one transaction of its own) and return its sha256 and size.

    Its chunks are COPYed as they are read and hashed again on the way: if the file is not
    what was hashed (``sha256``, or a first pass when not given), FileChanged and nothing is
    stored. FileTooLarge before anything is written.
    """
    path = Path(path)
    size = _regular_size(path)
    if size > max_bytes:
        raise _too_large(path, size, max_bytes)
    if sha256 is None:
        sha256, size = hash_file(path)
        if size > max_bytes:
            raise _too_large(path, size, max_bytes)
    key = check_sha256(sha256)
    chunks = -(-size // CHUNK_BYTES)
    with open(path, "rb") as f:
        while True:
            with conn.transaction():
                if conn.execute(INSERT_BLOB, [key, size, chunks]).fetchone() is None:
                    if conn.execute(TOUCH_BLOBS, [[key]]).fetchone() is not None:
                        return sha256, size  # stored already
                    continue  # pruned since the insert looked: insert it after all
                _copy_chunks(conn, key, f, path, sha256, size)
            return sha256, size


def _regular_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise errors.BadInput(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise errors.BadInput(f"{path} is not a regular file")
    return st.st_size


def _copy_chunks(
    conn: psycopg.Connection, key: bytes, f: BinaryIO, path: Path, sha256: str, size: int
) -> None:
    """COPY the file's chunks, re-hashing them; FileChanged (the caller rolls back) if the
    bytes are not the ones hashed."""
    digest, total, seq = hashlib.sha256(), 0, 0
    with conn.cursor() as cur, cur.copy(COPY_CHUNKS) as copy:
        copy.write(_COPY_HEADER)
        while chunk := f.read(CHUNK_BYTES):
            total += len(chunk)
            if total > size:
                break
            digest.update(chunk)
            copy.write(_COPY_ROW.pack(3, 32, key, 4, seq, len(chunk)))
            copy.write(chunk)
            seq += 1
        if total != size or digest.hexdigest() != sha256:
            raise FileChanged(f"{path} changed while it was uploaded: nothing of it was stored")
        copy.write(_COPY_TRAILER)


def put_stream(
    conn: psycopg.Connection, stream: BinaryIO, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> tuple[str, int]:
    """Store what ``stream`` yields: spooled to a temporary file (at most ``max_bytes``, else
    FileTooLarge), hashed on the way, then put_file."""
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(prefix="smifdb-upload-") as spool:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise FileTooLarge(
                    f"the upload is over the limit of {max_bytes:,} bytes per file "
                    f"(raise it with {MAX_FILE_BYTES_ENV})"
                )
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        return put_file(conn, Path(spool.name), max_bytes=max_bytes, sha256=digest.hexdigest())


def put_tree(
    conn: psycopg.Connection,
    root: Path,
    rel_paths: Iterable[str],
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> list[FileEntry]:
    """Store the files at these paths under ``root`` (each a file of its own transaction;
    those stored already only touched) and return their entries, with their exec bits.

    Every path is checked (inside ``root``, symlinks included; a regular file; within the
    limit) before anything is written.
    """
    root = Path(root)
    real_root = root.resolve()
    found: list[tuple[str, Path, int, int]] = []
    for rel in rel_paths:
        path = check_path(rel)
        full = root / path
        real = full.resolve()
        if not real.is_relative_to(real_root):
            raise errors.BadInput(f"{path} leads out of {root} (to {real})")
        try:
            st = os.stat(real)
        except OSError as exc:
            raise errors.BadInput(f"cannot read {full}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise errors.BadInput(f"{full} is not a regular file")
        if st.st_size > max_bytes:
            raise _too_large(full, st.st_size, max_bytes)
        found.append((path, real, st.st_size, 0o755 if st.st_mode & 0o100 else 0o644))
    hashed = [(rel, real, *hash_file(real), mode) for rel, real, _, mode in found]
    absent = missing(conn, {sha for _, _, sha, _, _ in hashed})
    entries = []
    for rel, real, sha, size, mode in hashed:
        if sha in absent:
            sha, size = put_file(conn, real, max_bytes=max_bytes, sha256=sha)
            absent.discard(sha)
        entries.append(FileEntry(rel, sha, size, mode))
    return entries


# -- reading ----------------------------------------------------------------------------


def read_chunks(conn: psycopg.Connection, sha256: str) -> Iterator[bytes]:
    """A blob's bytes, a chunk at a time, READ_AHEAD chunks per statement (no long
    transaction, bounded memory). Checked as it goes: BlobCorrupt, naming the blob and the
    chunk, if a chunk is missing or sizes disagree, and if the whole fails its hash, raised
    before the last chunk is yielded (a consumer never gets all of a corrupt blob)."""
    return read_chunks_with(lambda: contextlib.nullcontext(conn), sha256)


def read_chunks_with(
    borrow: Callable[[], AbstractContextManager[psycopg.Connection]], sha256: str
) -> Iterator[bytes]:
    """read_chunks, with a connection borrowed (``borrow()``) for each statement only: a
    client that reads slowly holds no connection between batches."""
    key = check_sha256(sha256)

    def query(sql: str, params: list[Any], **kw: Any) -> list[tuple[Any, ...]]:
        with borrow() as conn:
            return conn.execute(sql, params, **kw).fetchall()

    found = query(BLOB, [key])
    row = found[0] if found else None
    if row is None:
        raise BlobMissing(f"blob {sha256} is not stored")
    size, chunks = row
    digest, total, seq = hashlib.sha256(), 0, 0
    held: bytes | None = None
    while seq < chunks:
        rows = query(READ_CHUNKS, [key, seq, READ_AHEAD], binary=True)
        if not rows or rows[0][0] != seq:
            if not query(BLOB, [key]):
                raise BlobMissing(f"blob {sha256} was deleted while it was read")
            raise BlobCorrupt(f"blob {sha256} is corrupt: chunk {seq} of {chunks} is missing")
        for n, data in rows:
            if n >= chunks:
                break
            if n != seq:
                raise BlobCorrupt(f"blob {sha256} is corrupt: chunk {seq} of {chunks} is missing")
            total += len(data)
            if total > size:
                raise BlobCorrupt(
                    f"blob {sha256} is corrupt: chunk {seq} ends at byte {total:,}, past "
                    f"its size of {size:,}"
                )
            digest.update(data)
            if held is not None:
                yield held
            held = bytes(data)
            seq += 1
    if total != size:
        raise BlobCorrupt(
            f"blob {sha256} is corrupt: its {chunks} chunks hold {total:,} bytes, not {size:,}"
        )
    if digest.hexdigest() != sha256:
        raise BlobCorrupt(
            f"blob {sha256} is corrupt: its chunks 0-{max(chunks - 1, 0)} hash to "
            f"{digest.hexdigest()}"
        )
    if held is not None:
        yield held


def get_file(conn: psycopg.Connection, sha256: str, dest: Path, *, mode: int = 0o644) -> None:
    """Write a blob to ``dest``: into a temporary file beside it, verified, then renamed into
    place. On any error (a corrupt blob, a full disk) the temporary file is removed and
    ``dest`` is left as it was."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in read_chunks(conn, sha256):
                f.write(chunk)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- records ----------------------------------------------------------------------------


def _add(conn: psycopg.Connection, sql: str, owner: int, entries: Iterable[FileEntry]) -> None:
    params = {"owner": owner, **_entries(entries)}
    if not params["paths"]:
        return
    try:
        conn.execute(sql, params)
    except psycopg.errors.UniqueViolation as exc:
        raise errors.Conflict(
            f"a file path is recorded already: {exc.diag.message_detail}"
        ) from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        detail = exc.diag.message_detail or ""
        if "blobs" in detail or "sha256" in detail:
            raise BlobMissing(f"a file names a blob that is not stored: {detail}") from exc
        raise errors.NotFound(f"no such record: {detail}") from exc


def add_workflow_files(
    conn: psycopg.Connection, workflow_id: int, entries: Iterable[FileEntry]
) -> None:
    """Name files present in every job's folder of a workflow (one statement)."""
    _add(conn, ADD_WORKFLOW_FILES, workflow_id, entries)


def workflow_files(conn: psycopg.Connection, workflow_id: int) -> list[FileEntry]:
    return [_entry(*r) for r in conn.execute(WORKFLOW_FILES, [workflow_id])]


def job_outputs(conn: psycopg.Connection, job_ids: list[int]) -> dict[int, list[FileEntry]]:
    """The recorded outputs of these jobs (a job with none is absent)."""
    out: dict[int, list[FileEntry]] = {}
    for job_id, *row in conn.execute(JOB_OUTPUTS, [list(job_ids)]):
        out.setdefault(job_id, []).append(_entry(*row))
    return out


def add_model_run_files(
    conn: psycopg.Connection,
    model_run_id: int,
    entries: Iterable[FileEntry],
    *,
    replace: bool = False,
) -> None:
    """Name files of a model run (one statement). A path recorded already is a Conflict,
    unless ``replace``: then it names the new blob (a decision-state file rewritten)."""
    sql = REPLACE_MODEL_RUN_FILES if replace else ADD_MODEL_RUN_FILES
    _add(conn, sql, model_run_id, entries)


def model_run_files(
    conn: psycopg.Connection, model_run_id: int, prefix: str | None = None
) -> list[FileEntry]:
    """A model run's files, those whose path starts with ``prefix`` if given (a plain string
    prefix: 'results/' for a folder)."""
    rows = conn.execute(MODEL_RUN_FILES, {"id": model_run_id, "prefix": prefix})
    return [_entry(*r) for r in rows]


# -- pruning ----------------------------------------------------------------------------


def count_unreferenced(
    conn: psycopg.Connection, *, grace: timedelta = timedelta(hours=1)
) -> tuple[int, int]:
    """How many blobs prune_blobs would delete now, and their bytes."""
    count, size = conn.execute(COUNT_UNREFERENCED, {"grace": grace}).fetchone()
    return count, size


def delete_unreferenced(
    conn: psycopg.Connection, *, grace: timedelta = timedelta(hours=1), limit: int = 10_000
) -> tuple[int, int]:
    """Delete blobs nothing names and nobody used within ``grace``: at most ``limit`` blobs
    and PRUNE_MAX_CHUNKS chunks per transaction, skipping rows others hold. Returns the
    blobs deleted and their bytes."""
    deleted = freed = 0
    while True:
        try:
            with conn.transaction():
                rows = conn.execute(LOCK_UNREFERENCED, {"grace": grace, "limit": limit}).fetchall()
                if not rows:
                    return deleted, freed
                take, chunks, size = [], 0, 0
                for sha, blob_size, blob_chunks in rows:
                    if take and chunks + blob_chunks > PRUNE_MAX_CHUNKS:
                        break
                    take.append(sha)
                    chunks += blob_chunks
                    size += blob_size
                conn.execute(DELETE_CHUNKS, [take])
                n = conn.execute(DELETE_BLOBS, [take]).rowcount
        except psycopg.errors.ForeignKeyViolation:
            # A record named one of them and committed after this statement's snapshot:
            # the next pass sees it and leaves that blob alone.
            continue
        deleted += n
        freed += size


def prune_blobs(
    conn: psycopg.Connection, *, grace: timedelta = timedelta(hours=1), limit: int = 10_000
) -> int:
    """Delete unreferenced blobs older than ``grace``; how many went."""
    return delete_unreferenced(conn, grace=grace, limit=limit)[0]
