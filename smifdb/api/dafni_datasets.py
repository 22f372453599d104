"""A local copy of DAFNI's data catalogue: the NID (metadata, versions, uploads) and the
search-and-discovery listing, on smifdb's blob store.

Paths, bodies and record shapes are what dafni-cli 2.1.1 sends and parses, so its dataset
commands work unchanged with its NID, search and DSS URLs pointed here. Uploads follow DAFNI's
MinIO flow: a temporary bucket, an upload URL per file (a PUT here, stored as a blob), then
the metadata that commits the bucket's files as a new dataset version. Errors are DAFNI's
``{"error", "error_message"}`` (smifdb.api.errors).
"""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smifdb import dafni, errors
from smifdb.api import downloads
from smifdb.api.errors import ApiError, read_json
from smifdb.api.pool import in_db
from smifdb.store import auth, blobs, datasets
from smifdb.store.blobs import FileEntry

# Keys the server sets in the metadata it answers; dropped from what a client sends.
SERVER_KEYS = ("@id", "dct:issued", "dct:modified", "mediatypes", "dcat:distribution")
SERVER_KEYS += ("dataset_type",)
# Parts of DAFNI's metadata that dafni-cli's parsers need present (as its template has them).
DEFAULTS: dict[str, dict] = {
    "dct:spatial": {"@id": None, "@type": "dct:Location", "rdfs:label": None},
    "dct:publisher": {"@id": None, "@type": "foaf:Organization", "foaf:name": None},
    "dct:conformsTo": {"@id": None, "@type": "dct:Standard", "label": None},
    "dct:PeriodOfTime": {
        "type": "dct:PeriodOfTime",
        "time:hasBeginning": None,
        "time:hasEnd": None,
    },
    "dcat:contactPoint": {"@type": "vcard:Organization", "vcard:fn": None, "vcard:hasEmail": None},
    "dct:license": {"@type": "LicenseDocument", "@id": None, "rdfs:label": None},
}
MAX_PAGE = 15_000  # dafni-cli asks for this many at once
MAX_PATH = 1024  # bytes of a file's name: a primary key, far below PostgreSQL's index row limit


# -- plumbing -------------------------------------------------------------------------------


def _file_path(name: Any) -> str:
    """A file's name in a dataset: a relative path inside it, of at most MAX_PATH bytes."""
    try:
        path = blobs.check_path(name)
    except errors.BadInput as exc:
        raise ApiError(400, exc.message) from exc
    if len(path.encode(errors="replace")) > MAX_PATH:
        raise ApiError(400, f"file name {path[:100]!r}… is over {MAX_PATH} bytes")
    return path


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _id(value: Any, what: str) -> uuid.UUID:
    """A UUID from a path or body; 404 naming it if it is none (an id that cannot exist)."""
    try:
        return uuid.UUID(str(value).removeprefix("temp-"))
    except ValueError:
        raise ApiError(404, f"no {what} {str(value)[:100]!r}") from None


def _path_id(request: Request, name: str, what: str) -> uuid.UUID:
    return _id(request.path_params[name], what)


async def _body(request: Request) -> dict:
    body = await read_json(request, max_bytes=request.app.state.max_body)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _metadata(body: Mapping) -> dict:
    """The body's ``metadata``, validated (400 listing every problem), server keys dropped."""
    if "metadata" not in body:
        raise ApiError(400, 'the body must be {"metadata": {...}, ...}')
    given = body["metadata"]
    if isinstance(given, dict):
        given = {k: v for k, v in given.items() if k not in SERVER_KEYS}
    return dafni.validate_dataset_metadata(given)


def _auth(owner_id: int | None, user: auth.User, asset_id: str) -> dict:
    mine = owner_id == user.id
    return {
        "view": True,
        "read": True,
        "update": mine or user.is_admin,
        "destroy": mine or user.is_admin,
        "reason": "Owner" if mine else "Local user",
        "asset_id": asset_id,
    }


def _ids(dataset_id: uuid.UUID, version_id: uuid.UUID, metadata_id: uuid.UUID) -> dict:
    return {
        "datasetId": str(dataset_id),
        "versionId": str(version_id),
        "metadataId": str(metadata_id),
    }


# -- records --------------------------------------------------------------------------------


def _download_url(request: Request, version_id: uuid.UUID, path: str) -> str:
    return f"{downloads.public_base(request)}/nid/download/{version_id}/{quote(path)}"


def _full_metadata(row: Mapping, files: list[dict], request: Request) -> dict:
    """The stored metadata as DAFNI answers it: defaults filled in, server fields added."""
    metadata = dict(row["metadata"])
    for key, default in DEFAULTS.items():
        given = metadata.get(key)
        metadata[key] = {**default, **given} if isinstance(given, dict) else dict(default)
    metadata["@id"] = f"{row['dataset_id']}:{row['version_id']}:{row['metadata_id']}"
    metadata["dct:issued"] = _ts(row["created_at"])
    metadata["dct:modified"] = _ts(row["metadata_created_at"])
    metadata["dct:created"] = metadata.get("dct:created") or _ts(row["dataset_created_at"])
    metadata["dcat:distribution"] = [
        {
            "@id": f"{row['version_id']}/{f['path']}",
            "@type": "dcat:Distribution",
            "spdx:fileName": f["path"],
            "dcat:byteSize": f["size"],
            "dcat:mediaType": f["media_type"],
            "dcat:downloadURL": _download_url(request, row["version_id"], f["path"]),
            "spdx:checksum": {"spdx:algorithm": "SHA256", "spdx:checksumValue": f["sha256"]},
        }
        for f in files
    ]
    metadata["mediatypes"] = sorted({f["media_type"] for f in files})
    return metadata


def _version_record(
    request: Request, versions: list[dict], files: list[dict], version_id: uuid.UUID
) -> dict:
    row = next(v for v in versions if v["version_id"] == version_id)
    reference = row["reference_url"]
    return {
        "@context": ["metadata-v1"],
        "id": str(version_id),
        "parent": str(row["dataset_id"]),
        "metadata_id": str(row["metadata_id"]),
        "owner": row["dataset_owner"],
        "status": "ingested",
        "type": "reference" if reference else "internal",
        "reference_url": reference,
        "auth": _auth(row["dataset_owner_id"], request.user, str(row["dataset_id"])),
        "metadata": _full_metadata(row, files, request),
        "version_history": [
            {
                "id": str(v["version_id"]),
                "version_message": v["metadata"].get("dafni_version_note") or "",
                "version_tags": ["latest"] if i == 0 else [],
                "publication_date": _ts(v["created_at"]),
                "metadata_versions": v["metadata_versions"],
            }
            for i, v in enumerate(versions)
        ],
    }


def _catalogue_record(row: Mapping, files: list[dict]) -> dict:
    metadata = row["metadata"]
    period = metadata.get("dct:PeriodOfTime") or {}
    publisher = (metadata.get("dct:publisher") or {}).get("foaf:name")
    return {
        "id": {
            "asset_id": f"{row['dataset_id']}:{row['version_id']}",
            "dataset_uuid": str(row["dataset_id"]),
            "version_uuid": str(row["version_id"]),
            "metadata_uuid": str(row["metadata_id"]),
        },
        "title": metadata.get("dct:title"),
        "description": metadata.get("dct:description"),
        "subject": metadata.get("dct:subject"),
        "source": publisher or row["dataset_owner"],
        "status": "ingested",
        "type": "reference" if row["reference_url"] else "internal",
        "formats": sorted({f["media_type"] for f in files}),
        "modified_date": _ts(row["metadata_created_at"]),
        "date_range": {
            "begin": period.get("time:hasBeginning"),
            "end": period.get("time:hasEnd"),
        },
        "version_message": metadata.get("dafni_version_note") or "",
    }


# -- search and discovery -------------------------------------------------------------------


def _filters(body: Mapping) -> tuple[int, int, list[str], dict | None]:
    """(start, size, search terms, date range) of a catalogue query; 400 if malformed."""
    offset = body.get("offset", {})
    if not isinstance(offset, dict):
        raise ApiError(400, "offset must be {start, size}")
    start, size = offset.get("start", 0), offset.get("size", 100)
    for name, value in (("offset.start", start), ("offset.size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ApiError(400, f"{name} must be a whole number, not {value!r}")
    if body.get("sort_by", "recent") != "recent":
        raise ApiError(400, "sort_by: only 'recent' is supported")
    text = body.get("search_text", "")
    if not isinstance(text, str):
        raise ApiError(400, "search_text must be a string")
    dates = body.get("date_range")
    if dates is not None:
        if not isinstance(dates, dict):
            raise ApiError(400, "date_range must be {begin, end, data_with_no_date}")
        for key in ("begin", "end"):
            if dates.get(key) is not None and dafni.parse_date(dates[key]) is None:
                raise ApiError(400, f"date_range.{key} must be an ISO 8601 date")
    return start, min(size, MAX_PAGE), text.lower().split(), dates


def _matches(metadata: Mapping, terms: list[str], dates: Mapping | None) -> bool:
    """Every search term in the title, description, subject or keywords; the dataset's period
    overlapping the date range (one with no dates only if ``data_with_no_date``)."""
    words = [metadata.get(k) for k in ("dct:title", "dct:description", "dct:subject")]
    words += metadata.get("dcat:keyword") or []
    text = " ".join(w for w in words if isinstance(w, str)).lower()
    if not all(term in text for term in terms):
        return False
    if dates is None:
        return True
    period = metadata.get("dct:PeriodOfTime") or {}
    begin = dafni.parse_date(period.get("time:hasBeginning"))
    end = dafni.parse_date(period.get("time:hasEnd"))
    if begin is None and end is None:
        return bool(dates.get("data_with_no_date", True))
    after, before = dafni.parse_date(dates.get("begin")), dafni.parse_date(dates.get("end"))
    if after is not None and (end or begin) < after:
        return False
    return before is None or (begin or end) <= before


async def catalogue(request: Request) -> JSONResponse:
    start, size, terms, dates = _filters(await _body(request))

    def read(conn: psycopg.Connection) -> dict:
        found = [r for r in datasets.latest_versions(conn) if _matches(r["metadata"], terms, dates)]
        page = found[start : start + size]
        files = datasets.files(conn, [r["version_id"] for r in page])
        shown = [_catalogue_record(r, files.get(r["version_id"], [])) for r in page]
        return {"metadata": shown, "total": len(found), "filters": {}}

    return JSONResponse(await in_db(request, read))


# -- metadata -------------------------------------------------------------------------------


async def validate(request: Request) -> JSONResponse:
    _metadata(await _body(request))
    return JSONResponse({"valid": True})


async def metadata_get(request: Request) -> JSONResponse:
    version_id = _path_id(request, "version_id", "dataset version")

    def read(conn: psycopg.Connection) -> dict:
        versions = datasets.versions_of(conn, version_id)
        if not versions:
            raise ApiError(404, f"no dataset version {version_id}")
        files = datasets.files(conn, [version_id]).get(version_id, [])
        return _version_record(request, versions, files, version_id)

    return JSONResponse(await in_db(request, read))


async def metadata_add(request: Request) -> JSONResponse:
    """A new metadata version of a dataset version (``dafni upload dataset-metadata``)."""
    dataset_id = _path_id(request, "dataset_id", "dataset")
    version_id = _path_id(request, "version_id", "dataset version")
    metadata = _metadata(await _body(request))
    user = request.user
    metadata_id = await in_db(
        request, lambda conn: datasets.add_metadata(conn, dataset_id, version_id, user, metadata)
    )
    return JSONResponse(_ids(dataset_id, version_id, metadata_id), 201)


async def metadata_delete(request: Request) -> Response:
    metadata_id = _path_id(request, "metadata_id", "dataset metadata")
    await in_db(request, datasets.delete_metadata, metadata_id, request.user)
    return Response(status_code=204)


# -- uploads --------------------------------------------------------------------------------


async def bucket_create(request: Request) -> JSONResponse:
    """A temporary bucket; its id as DAFNI gives it, a JSON string ``temp-<uuid>``."""
    bucket_id = await in_db(request, datasets.start_upload, request.user)
    return JSONResponse(f"temp-{bucket_id}", 201)


async def bucket_urls(request: Request) -> JSONResponse:
    """An upload URL for each file name of ``datafiles`` (names may hold folders: a/b.csv)."""
    body = await _body(request)
    bucket_id = _id(body.get("bucketId"), "upload bucket")
    names = body.get("datafiles")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ApiError(400, "datafiles must be a list of file names")
    paths = {name: _file_path(name) for name in names}
    await in_db(request, datasets.upload, bucket_id, request.user)
    base = f"{downloads.public_base(request)}/nid/upload/{bucket_id}"
    return JSONResponse({"urls": {name: f"{base}/{quote(path)}" for name, path in paths.items()}})


async def bucket_put(request: Request) -> Response:
    """One file of a bucket: spooled as it arrives (within the per-file limit), hashed,
    stored as a blob, then named in the bucket."""
    bucket_id = _path_id(request, "bucket_id", "upload bucket")
    path = _file_path(request.path_params["path"])
    user, limit = request.user, blobs.max_file_bytes()
    await in_db(request, datasets.upload, bucket_id, user)  # 404 before reading the body
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    async with downloads.spooled_body(request, limit, "a file") as body:

        def store(conn: psycopg.Connection) -> None:
            blobs.put_file(conn, body.path, max_bytes=limit, sha256=body.sha256)
            entry = FileEntry(path, body.sha256, body.size)
            datasets.put_upload_file(conn, bucket_id, user, entry, media)

        await in_db(request, store)
    return Response(status_code=204)


async def bucket_delete(request: Request) -> Response:
    bucket_id = _path_id(request, "bucket_id", "upload bucket")
    await in_db(request, datasets.delete_upload, bucket_id, request.user)
    return Response(status_code=204)


# -- datasets and versions ------------------------------------------------------------------


async def _commit(request: Request, source: Callable[[dict], dict]) -> JSONResponse:
    """A new dataset, or (with a dataset id in the path) a new version of one."""
    body = await _body(request)
    dataset_id = (
        _path_id(request, "dataset_id", "dataset") if "dataset_id" in request.path_params else None
    )
    metadata = _metadata(body)
    given = source(body)
    user = request.user
    ids = await in_db(
        request,
        lambda conn: datasets.commit_version(conn, user, metadata, dataset_id=dataset_id, **given),
    )
    return JSONResponse(_ids(*ids), 201)


def _bucket_source(body: dict) -> dict:
    return {"bucket_id": _id(body.get("bucketId"), "upload bucket")}


def _reference_source(body: dict) -> dict:
    url = body.get("reference")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
        raise ApiError(400, "reference must be an http(s) URL")
    if "\x00" in url:
        raise ApiError(400, "reference holds a NUL character")
    return {"reference_url": url}


async def dataset_commit(request: Request) -> JSONResponse:
    return await _commit(request, _bucket_source)


async def reference_commit(request: Request) -> JSONResponse:
    return await _commit(request, _reference_source)


async def dataset_delete(request: Request) -> Response:
    dataset_id = _path_id(request, "dataset_id", "dataset")
    await in_db(request, datasets.delete_dataset, dataset_id, request.user)
    return Response(status_code=204)


async def version_delete(request: Request) -> Response:
    version_id = _path_id(request, "version_id", "dataset version")
    await in_db(request, datasets.delete_version, version_id, request.user)
    return Response(status_code=204)


async def download(request: Request) -> Response:
    version_id = _path_id(request, "version_id", "dataset version")
    path = request.path_params["path"]
    try:
        path = blobs.check_path(path)
    except errors.BadInput:
        raise ApiError(404, f"dataset version {version_id} has no file {path[:200]!r}") from None
    entry = await in_db(request, datasets.file, version_id, path)
    if entry is None:
        raise ApiError(404, f"dataset version {version_id} has no file {path[:200]!r}")
    return await downloads.file_response(request, entry)


ROUTES = [
    Route(path, handler, methods=[method])
    for path, handler, method in [
        ("/catalogue/", catalogue, "POST"),
        ("/nid/validate/", validate, "POST"),
        ("/nid/upload/", bucket_create, "POST"),
        ("/nid/upload/", bucket_urls, "PATCH"),
        ("/nid/upload/{bucket_id}/{path:path}", bucket_put, "PUT"),
        ("/assets/{bucket_id}", bucket_delete, "DELETE"),
        ("/nid/dataset/", dataset_commit, "POST"),
        ("/nid/dataset/{dataset_id}", dataset_commit, "POST"),
        ("/nid/dataset/{dataset_id}", dataset_delete, "DELETE"),
        ("/nid/dataset-reference/", reference_commit, "POST"),
        ("/nid/dataset-reference/{dataset_id}", reference_commit, "POST"),
        ("/nid/metadata/{version_id}", metadata_get, "GET"),
        ("/nid/metadata/{metadata_id}", metadata_delete, "DELETE"),
        ("/nid/metadata/{dataset_id}/{version_id}", metadata_add, "POST"),
        ("/nid/version/{version_id}/", version_delete, "DELETE"),
        ("/nid/download/{version_id}/{path:path}", download, "GET"),
    ]
]
