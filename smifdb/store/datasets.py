"""The DAFNI data catalogue's rows: datasets, versions, metadata versions and their files.

A dataset's files are blobs of the blob store (smifdb.store.blobs), named by relative paths
here as ``workflow_files`` names them for a workflow. dafni-cli uploads a version in steps —
a temporary bucket, one PUT per file, then the metadata that commits it — so a bucket's files
are rows too, until the commit moves them to the new version in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from smifdb import errors
from smifdb.store.auth import User
from smifdb.store.blobs import FileEntry, check_path, check_sha256


class NotFound(errors.NotFound):
    pass


def _owner(user: User) -> dict[str, Any]:
    return {"owner": user.name, "owner_id": user.id}


def _rows(conn: psycopg.Connection, query: str, args: Any = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, args).fetchall()


def _may_change(row: dict | None, user: User, what: str) -> None:
    if row is None:
        raise NotFound(f"no {what}")
    if row["owner_id"] != user.id and not user.is_admin:
        raise errors.Forbidden(f"only {row['owner']} (its owner) or an admin may change {what}")


# -- temporary buckets ----------------------------------------------------------------------

_SWEEP_UPLOADS = "DELETE FROM dafni_dataset_uploads WHERE created_at < now() - interval '1 day'"
_START_UPLOAD = """
INSERT INTO dafni_dataset_uploads (owner, owner_id) VALUES (%(owner)s, %(owner_id)s)
RETURNING bucket_id
"""
_UPLOAD = "SELECT bucket_id, owner, owner_id FROM dafni_dataset_uploads WHERE bucket_id = %s"
_PUT_UPLOAD_FILE = """
INSERT INTO dafni_dataset_upload_files (bucket_id, path, sha256, size, media_type)
SELECT bucket_id, %(path)s, %(sha)s, %(size)s, %(media)s FROM dafni_dataset_uploads
WHERE bucket_id = %(bucket)s AND owner_id = %(owner_id)s
ON CONFLICT (bucket_id, path) DO UPDATE
    SET sha256 = excluded.sha256, size = excluded.size, media_type = excluded.media_type
RETURNING 1
"""
_DELETE_UPLOAD = """
DELETE FROM dafni_dataset_uploads WHERE bucket_id = %s AND owner_id = %s RETURNING 1
"""


def start_upload(conn: psycopg.Connection, owner: User) -> uuid.UUID:
    """A new temporary bucket; abandoned ones older than a day are swept in the same go."""
    with conn.transaction():
        conn.execute(_SWEEP_UPLOADS)
        return conn.execute(_START_UPLOAD, _owner(owner)).fetchone()[0]


def upload(conn: psycopg.Connection, bucket_id: uuid.UUID, owner: User) -> dict:
    """The bucket, if it is this user's; NotFound else (another's bucket is not shown)."""
    rows = _rows(conn, _UPLOAD, [bucket_id])
    if not rows or rows[0]["owner_id"] != owner.id:
        raise NotFound(f"no upload bucket {bucket_id}")
    return rows[0]


def put_upload_file(
    conn: psycopg.Connection,
    bucket_id: uuid.UUID,
    owner: User,
    entry: FileEntry,
    media_type: str,
) -> None:
    """Name a stored blob as a file of the bucket (a second PUT of a path replaces it)."""
    args = {
        "bucket": bucket_id,
        "owner_id": owner.id,
        "path": check_path(entry.path),
        "sha": check_sha256(entry.sha256),
        "size": entry.size,
        "media": media_type,
    }
    if conn.execute(_PUT_UPLOAD_FILE, args).fetchone() is None:
        raise NotFound(f"no upload bucket {bucket_id}")


def delete_upload(conn: psycopg.Connection, bucket_id: uuid.UUID, owner: User) -> None:
    if conn.execute(_DELETE_UPLOAD, [bucket_id, owner.id]).fetchone() is None:
        raise NotFound(f"no upload bucket {bucket_id}")


# -- committing a version -------------------------------------------------------------------

_ADD_DATASET = """
INSERT INTO dafni_datasets (owner, owner_id) VALUES (%(owner)s, %(owner_id)s)
RETURNING dataset_id
"""
_DATASET = "SELECT dataset_id, owner, owner_id FROM dafni_datasets WHERE dataset_id = %s FOR SHARE"
_ADD_VERSION = """
INSERT INTO dafni_dataset_versions (dataset_id, reference_url, owner, owner_id)
VALUES (%(dataset)s, %(reference)s, %(owner)s, %(owner_id)s)
RETURNING version_id
"""
_ADD_METADATA = """
INSERT INTO dafni_dataset_metadata (version_id, metadata, owner, owner_id)
VALUES (%(version)s, %(metadata)s, %(owner)s, %(owner_id)s)
RETURNING metadata_id
"""
_TAKE_UPLOAD = """
DELETE FROM dafni_dataset_uploads WHERE bucket_id = %s AND owner_id = %s RETURNING bucket_id
"""
_MOVE_FILES = """
INSERT INTO dafni_dataset_files (version_id, path, sha256, size, media_type)
SELECT %(version)s, path, sha256, size, media_type FROM dafni_dataset_upload_files
WHERE bucket_id = %(bucket)s
"""


def commit_version(
    conn: psycopg.Connection,
    owner: User,
    metadata: dict,
    *,
    bucket_id: uuid.UUID | None = None,
    reference_url: str | None = None,
    dataset_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A new version (of a new dataset, or of ``dataset_id``: its owner's) holding a bucket's
    files or pointing at ``reference_url``, with its first metadata; the bucket is emptied.
    One transaction: (dataset id, version id, metadata id)."""
    with conn.transaction():
        if dataset_id is None:
            dataset_id = conn.execute(_ADD_DATASET, _owner(owner)).fetchone()[0]
        else:
            found = _rows(conn, _DATASET, [dataset_id])
            _may_change(found[0] if found else None, owner, f"dataset {dataset_id}")
        args = {"dataset": dataset_id, "reference": reference_url, **_owner(owner)}
        version_id = conn.execute(_ADD_VERSION, args).fetchone()[0]
        if bucket_id is not None:
            # Moved before the bucket goes: its files' rows cascade with it.
            conn.execute(_MOVE_FILES, {"version": version_id, "bucket": bucket_id})
            if conn.execute(_TAKE_UPLOAD, [bucket_id, owner.id]).fetchone() is None:
                raise NotFound(f"no upload bucket {bucket_id}")
        metadata_args = {"version": version_id, "metadata": Jsonb(metadata), **_owner(owner)}
        metadata_id = conn.execute(_ADD_METADATA, metadata_args).fetchone()[0]
    return dataset_id, version_id, metadata_id


_VERSION_OF = """
SELECT v.version_id, v.dataset_id, d.owner, d.owner_id
FROM dafni_dataset_versions v JOIN dafni_datasets d USING (dataset_id)
WHERE v.version_id = %s FOR SHARE OF v
"""


def add_metadata(
    conn: psycopg.Connection,
    dataset_id: uuid.UUID,
    version_id: uuid.UUID,
    owner: User,
    metadata: dict,
) -> uuid.UUID:
    """A new metadata version of a dataset version (its dataset owner's): the metadata id."""
    with conn.transaction():
        found = _rows(conn, _VERSION_OF, [version_id])
        row = found[0] if found and found[0]["dataset_id"] == dataset_id else None
        _may_change(row, owner, f"version {version_id} of dataset {dataset_id}")
        args = {"version": version_id, "metadata": Jsonb(metadata), **_owner(owner)}
        return conn.execute(_ADD_METADATA, args).fetchone()[0]


# -- reading --------------------------------------------------------------------------------

_VERSIONS = """
SELECT v.version_id, v.dataset_id, v.reference_url, v.created_at, v.owner, v.owner_id,
       d.owner AS dataset_owner, d.owner_id AS dataset_owner_id, d.created_at AS dataset_created_at,
       m.metadata_id, m.metadata, m.created_at AS metadata_created_at,
       (SELECT count(*) FROM dafni_dataset_metadata c WHERE c.version_id = v.version_id)
           AS metadata_versions
FROM dafni_dataset_versions v
JOIN dafni_datasets d USING (dataset_id)
JOIN LATERAL (
    SELECT metadata_id, metadata, created_at FROM dafni_dataset_metadata m
    WHERE m.version_id = v.version_id ORDER BY created_at DESC, metadata_id LIMIT 1
) m ON true
WHERE {where}
ORDER BY v.created_at DESC, v.version_id
"""
_VERSION = _VERSIONS.format(
    where="v.dataset_id = (SELECT dataset_id FROM dafni_dataset_versions WHERE version_id = %s)"
)
_LATEST = """
SELECT DISTINCT ON (dataset_id) * FROM ({all}) s ORDER BY dataset_id, created_at DESC, version_id
""".format(all=_VERSIONS.format(where="true"))
_FILES = """
SELECT version_id, path, encode(sha256, 'hex') AS sha256, size, media_type
FROM dafni_dataset_files WHERE version_id = ANY(%s) ORDER BY version_id, path
"""
_FILE = """
SELECT path, encode(sha256, 'hex'), size FROM dafni_dataset_files
WHERE version_id = %s AND path = %s
"""


def versions_of(conn: psycopg.Connection, version_id: uuid.UUID) -> list[dict]:
    """Every version of the dataset that ``version_id`` belongs to, newest first, each with
    its newest metadata; empty if there is no such version."""
    return _rows(conn, _VERSION, [version_id])


def latest_versions(conn: psycopg.Connection) -> list[dict]:
    """Each dataset's newest version, with its newest metadata (the catalogue's rows)."""
    return sorted(_rows(conn, _LATEST), key=lambda r: r["metadata_created_at"], reverse=True)


def files(conn: psycopg.Connection, version_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list]:
    """The files of these versions: version id -> [{path, sha256, size, media_type}]."""
    out: dict[uuid.UUID, list] = {}
    for row in _rows(conn, _FILES, [list(version_ids)]):
        out.setdefault(row.pop("version_id"), []).append(row)
    return out


def file(conn: psycopg.Connection, version_id: uuid.UUID, path: str) -> FileEntry | None:
    row = conn.execute(_FILE, [version_id, path]).fetchone()
    return FileEntry(*row) if row else None


_EXISTING = (
    "SELECT version_id, reference_url FROM dafni_dataset_versions WHERE version_id = ANY(%s)"
)


def version_files(
    conn: psycopg.Connection, version_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, list[FileEntry]]:
    """The files of these versions as blob entries, for a step's dataslots; NotFound naming
    the versions that are gone, or that point at a URL (no files to fetch)."""
    wanted = list(dict.fromkeys(version_ids))
    found = {r[0]: r[1] for r in conn.execute(_EXISTING, [wanted])}
    if missing := [str(v) for v in wanted if v not in found]:
        raise NotFound(f"no dataset version(s) {', '.join(missing)}")
    if references := [str(v) for v in wanted if found[v] is not None]:
        raise errors.Conflict(
            f"dataset version(s) {', '.join(references)} are references to URLs: they hold "
            "no files to put in a dataslot"
        )
    listed = files(conn, wanted)
    return {
        v: [FileEntry(r["path"], r["sha256"], r["size"]) for r in listed.get(v, [])] for v in wanted
    }


# -- deleting -------------------------------------------------------------------------------

_LOCK_DATASET = (
    "SELECT dataset_id, owner, owner_id FROM dafni_datasets WHERE dataset_id = %s FOR UPDATE"
)
_DELETE_DATASET = "DELETE FROM dafni_datasets WHERE dataset_id = %s"
_LOCK_VERSION = """
SELECT v.dataset_id, d.owner, d.owner_id FROM dafni_dataset_versions v
JOIN dafni_datasets d USING (dataset_id) WHERE v.version_id = %s FOR UPDATE OF d
"""
_DELETE_VERSION = "DELETE FROM dafni_dataset_versions WHERE version_id = %s"
_VERSIONS_LEFT = "SELECT count(*) FROM dafni_dataset_versions WHERE dataset_id = %s"
_LOCK_METADATA = """
SELECT m.version_id, d.owner, d.owner_id FROM dafni_dataset_metadata m
JOIN dafni_dataset_versions v USING (version_id) JOIN dafni_datasets d USING (dataset_id)
WHERE m.metadata_id = %s FOR UPDATE OF d
"""
_METADATA_LEFT = "SELECT count(*) FROM dafni_dataset_metadata WHERE version_id = %s"
_DELETE_METADATA = "DELETE FROM dafni_dataset_metadata WHERE metadata_id = %s"


def delete_dataset(conn: psycopg.Connection, dataset_id: uuid.UUID, user: User) -> None:
    """A dataset with all its versions, metadata and file names (the blobs go with prune)."""
    with conn.transaction():
        found = _rows(conn, _LOCK_DATASET, [dataset_id])
        _may_change(found[0] if found else None, user, f"dataset {dataset_id}")
        conn.execute(_DELETE_DATASET, [dataset_id])


def delete_version(conn: psycopg.Connection, version_id: uuid.UUID, user: User) -> None:
    """One version; its dataset goes too when it was the last (DAFNI keeps no empty ones)."""
    with conn.transaction():
        found = _rows(conn, _LOCK_VERSION, [version_id])
        _may_change(found[0] if found else None, user, f"dataset version {version_id}")
        conn.execute(_DELETE_VERSION, [version_id])
        dataset_id = found[0]["dataset_id"]
        if conn.execute(_VERSIONS_LEFT, [dataset_id]).fetchone()[0] == 0:
            conn.execute(_DELETE_DATASET, [dataset_id])


def delete_metadata(conn: psycopg.Connection, metadata_id: uuid.UUID, user: User) -> None:
    """One metadata version; never a version's only one (delete the version instead)."""
    with conn.transaction():
        found = _rows(conn, _LOCK_METADATA, [metadata_id])
        _may_change(found[0] if found else None, user, f"dataset metadata {metadata_id}")
        if conn.execute(_METADATA_LEFT, [found[0]["version_id"]]).fetchone()[0] <= 1:
            raise errors.Conflict(
                f"metadata {metadata_id} is its version's only metadata: delete the version"
            )
        conn.execute(_DELETE_METADATA, [metadata_id])
