"""Stored files over HTTP: job outputs listed a page at a time and each file streamed, and
uploaded bodies spooled and hashed on their way into the blob store.

A download reads its blob a batch of chunks per query, each on a pooled connection borrowed
for that query only (smifdb.store.blobs.read_chunks_with): a client that reads slowly, or not
at all, holds no database connection, and memory stays at one batch whatever the file's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from smifdb import errors
from smifdb.api import paging
from smifdb.api.errors import ApiError
from smifdb.api.pool import in_db
from smifdb.store import blobs, jobfiles
from smifdb.store.blobs import FileEntry


def public_base(request: Request) -> str:
    """The base of the URLs this server hands out: its public URL, or its address as it
    listens (never the Host header, which a client chooses)."""
    if public := request.app.state.security.public_url:
        return public
    host, port = request.scope.get("server") or ("127.0.0.1", 80)
    host = f"[{host}]" if ":" in host else host
    return f"{request.url.scheme}://{host}:{port}"


def _row(key: str, entry: FileEntry, url: str) -> dict[str, Any]:
    return {"job": key, "path": entry.path, "size": entry.size, "sha256": entry.sha256, "url": url}


async def outputs_page(
    request: Request,
    workflow_id: int,
    keys: Sequence[str],
    url_for: Callable[[str, str], str],
    envelope: Callable[[list[dict]], dict[str, Any]],
) -> JSONResponse:
    """A page of the recorded outputs of a workflow's jobs ``keys``, in key and path order:
    each with its download URL (``url_for(key, path)``), the next page's cursor in ``next``
    and a ``Link`` header. ``envelope`` wraps the rows in the body its API uses."""
    # A cursor is good for this list only: this workflow, these jobs.
    jobs = hashlib.sha256("\0".join(keys).encode()).hexdigest()[:16]
    kind = f"outputs:{workflow_id}:{jobs}"
    limit, after = paging.limit(request), paging.cursor(request, kind, tuple)

    def read(conn: Any) -> list[tuple[str, FileEntry]]:
        return jobfiles.outputs_by_key(conn, workflow_id, keys, after=after, limit=limit + 1)

    found = await in_db(request, read)
    shown = found[:limit]
    following = None
    if len(found) > limit:
        following = paging.encode(kind, (shown[-1][0], shown[-1][1].path))
    headers = {"Link": paging.next_link(request, following)} if following else None
    body = envelope([_row(key, entry, url_for(key, entry.path)) for key, entry in shown])
    return JSONResponse({**body, "next": following}, headers=headers)


async def output_file(request: Request, workflow_id: int, key: str, path: str) -> Response:
    """One recorded output of job ``key``, streamed: 404 if there is none of that path."""
    try:
        path = blobs.check_path(path)
    except errors.BadInput as exc:
        raise ApiError(404, f"job {key!r} has no output {path[:200]!r}") from exc

    entry = await in_db(request, jobfiles.output, workflow_id, key, path)
    if entry is None:
        raise ApiError(404, f"job {key!r} has no output {path[:200]!r}")
    return await file_response(request, entry)


async def file_response(request: Request, entry: FileEntry) -> Response:
    """The blob of ``entry`` as an attachment: never shown inline, whatever it holds.

    Its first batch is read before the headers go, so a missing blob is a JSON error; a
    corrupt one found later ends the body short of its Content-Length, which clients notice
    (read_chunks raises before the last chunk, so no client gets all of a corrupt file)."""
    etag = f'"{entry.sha256}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": _attachment(entry.path.rsplit("/", 1)[-1]),
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    chunks = blobs.read_chunks_with(request.app.state.pool.connection, entry.sha256)
    first = await anyio.to_thread.run_sync(next, chunks, None)

    async def body() -> AsyncIterator[bytes]:
        chunk = first
        while chunk is not None:
            yield chunk
            chunk = await anyio.to_thread.run_sync(next, chunks, None)

    headers["Content-Length"] = str(entry.size)
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


def _attachment(name: str) -> str:
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@dataclass(frozen=True)
class Spooled:
    path: Path
    sha256: str
    size: int


@contextlib.asynccontextmanager
async def spooled_body(request: Request, limit: int, what: str) -> AsyncIterator[Spooled]:
    """The request's body in a temporary file as it arrives, hashed on the way: 413 past
    ``limit`` bytes (declared or sent), never all in memory. The file is gone after the block."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} over the limit of {limit:,} bytes")
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(prefix="smifdb-upload-") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{what} over the limit of {limit:,} bytes")
            digest.update(chunk)
            await anyio.to_thread.run_sync(spool.write, chunk)
        await anyio.to_thread.run_sync(spool.flush)
        yield Spooled(Path(spool.name), digest.hexdigest(), size)
