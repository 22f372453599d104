"""The runner's operations over HTTP: each a JSON POST to /api/runner/v1/<op> of one of the
API's URLs, and blobs streamed in and out.

Standard library only (http.client): a runner needs no database driver, credentials or
socket, only the URLs and a token. Each thread keeps one connection per API URL; a connection
idle for longer than a server keeps it is opened afresh rather than reused, since a request
sent on one the server has just closed cannot be told from one that was lost.

Failing over: a URL that refuses the connection is skipped at once (nothing was sent). A
request that fails once sent raises Unreachable, and the runner's recovery (the ``reconnect``
operation) hands back any claim whose answer was lost; outcomes are sent again, and the store
records each at most once.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from smifdb import errors
from smifdb.db import Backoff
from smifdb.store.blobs import CHUNK_BYTES, FileEntry
from smifdb.store.queue import ANYWHERE, FinishReport, Outcome, Scope
from smifdb.transport import (
    PROTOCOL,
    Beat,
    Refused,
    Unreachable,
    Unstorable,
    entry_from,
    outcome_json,
    outcomes_wire,
    report_from,
)

TOKEN_ENV = "SMIFDB_API_TOKEN"
REUSE_IDLE = 2.0  # seconds a kept-alive connection is reused (uvicorn closes them after 5)
TIMEOUT = 60.0  # seconds for any one request (a wait asks for its own)
MAX_REQUEST_BYTES = 16 * 2**20  # a batch of outcomes is sent in parts of about this size
DATA_PATIENCE = 300.0  # seconds files keep trying through an outage before the attempt fails


class Token:
    """The runner's API token, from $SMIFDB_API_TOKEN or a file (never argv, which `ps`
    shows). A file is read again after a refusal, so a renewed token is picked up."""

    def __init__(self, *, file: Path | None = None, value: str | None = None) -> None:
        self.file, self._value = file, value
        if file is None and value is None:
            self._value = os.environ.get(TOKEN_ENV) or None
        self.reload()
        if not self._value:
            raise errors.BadInput(
                f"a runner with --api needs a token: set {TOKEN_ENV} or pass --token-file"
            )

    def reload(self) -> None:
        if self.file is None:
            return
        try:
            self._value = Path(self.file).read_text().strip() or None
        except OSError as exc:
            raise errors.BadInput(f"--token-file {self.file}: {exc.strerror}") from exc

    @property
    def header(self) -> str:
        return f"Bearer {self._value}"


class Api:
    """Calls to one of several API processes. Thread-safe: each thread has its connections."""

    def __init__(self, urls: Sequence[str], token: Token, *, timeout: float = TIMEOUT) -> None:
        if not urls:
            raise errors.BadInput("--api needs at least one URL")
        self.targets = [_target(u) for u in urls]
        self.urls = [u.rstrip("/") for u in urls]
        self.token, self.timeout = token, timeout
        self.current = 0  # the URL that answered last; others are tried when it does not
        self._local = threading.local()
        self.refused_since: float | None = None
        self.batches = True  # cycles in the compact form: off once an API answers 404 to it

    # -- requests ----------------------------------------------------------------------------

    def call(
        self, op: str, body: dict[str, Any], *, retry: bool = False, timeout: float | None = None
    ) -> Any:
        """POST a JSON body to ``op``; its JSON answer. ``retry``: safe to send twice."""
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        with self.request("POST", op, data, headers, retry=retry, timeout=timeout) as resp:
            payload = resp.read()
        return json.loads(payload)["data"] if payload else None

    @contextlib.contextmanager
    def request(
        self,
        method: str,
        op: str,
        body: bytes | BinaryIO | None,
        headers: dict[str, str],
        *,
        retry: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """A response with a 2xx status, to be read within the block; errors mapped."""
        resp, index = self._send(method, op, body, headers, retry, timeout or self.timeout)
        try:
            if resp.status >= 300:
                self._raise(resp, op)
            self.refused_since = None
            yield resp
            if not resp.isclosed():
                resp.read()  # the whole body, so the connection can carry the next request
        except BaseException:
            self._drop(index)
            raise

    def _send(
        self,
        method: str,
        op: str,
        body: bytes | BinaryIO | None,
        headers: dict[str, str],
        retry: bool,
        timeout: float,
    ) -> tuple[http.client.HTTPResponse, int]:
        n, start = len(self.targets), self.current
        refused: list[str] = []
        for k in range(n):
            index = (start + k) % n
            for again in (False, True):
                try:
                    conn, reused = self._connection(index, timeout)
                except OSError as exc:  # nothing sent: the next URL
                    refused.append(f"{self.urls[index]}: {exc}")
                    break
                try:
                    if not hasattr(body, "read"):
                        headers = {**headers, "Content-Length": str(len(body or b""))}
                    elif again:
                        body.seek(0)  # type: ignore[union-attr]
                    conn.request(
                        method,
                        f"{self.targets[index][2]}/api/runner/{PROTOCOL}/{op}",
                        body=body,
                        headers={**headers, "Authorization": self.token.header},
                    )
                    resp = conn.getresponse()
                except (OSError, http.client.HTTPException) as exc:
                    self._drop(index)
                    if retry and reused and not again:
                        continue  # a kept-alive connection the server had closed
                    self.current = (index + 1) % n  # try another API next time
                    raise Unreachable(
                        f"{self.urls[index]} {op}: {exc or type(exc).__name__}"
                    ) from exc
                self._local.used[index] = time.monotonic()
                self.current = index
                return resp, index
        raise Unreachable("no API answered: " + "; ".join(refused))

    def _connection(self, index: int, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        local = self._local
        if not hasattr(local, "conns"):
            local.conns, local.used = {}, {}
        conn = local.conns.get(index)
        if conn is not None and time.monotonic() - local.used.get(index, 0) < REUSE_IDLE:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
                return conn, True
        if conn is not None:
            conn.close()
        scheme, netloc, _ = self.targets[index]
        if scheme == "https":
            # Certificates are checked against the system's CAs (or $SSL_CERT_FILE).
            conn = http.client.HTTPSConnection(
                netloc, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(netloc, timeout=timeout)
        try:
            conn.connect()
        except OSError:
            conn.close()
            local.conns.pop(index, None)
            raise
        local.conns[index] = conn
        return conn, False

    def _drop(self, index: int) -> None:
        conns = getattr(self._local, "conns", {})
        if (conn := conns.pop(index, None)) is not None:
            conn.close()

    def _raise(self, resp: http.client.HTTPResponse, op: str) -> None:
        text = resp.read()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:200].decode(errors="replace") or resp.reason
        status = resp.status
        if status in (401, 403):
            if self.refused_since is None:
                self.refused_since = time.monotonic()
            self.token.reload()
            raise Refused(f"the API refused the runner's token ({status}): {message}")
        if status == 422:
            raise Unstorable(message)
        if status >= 500 or status in (408, 429):
            raise Unreachable(f"{op}: {status} {message}")
        err = errors.Error(f"{op}: {message}")
        err.status = status
        raise err

    def close(self) -> None:
        for conn in getattr(self._local, "conns", {}).values():
            conn.close()
        self._local = threading.local()


def _target(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errors.BadInput(f"--api {url!r} is not an http:// or https:// URL")
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def check(api: Api, wait: float) -> dict[str, Any]:
    """At start: an API answers within ``wait`` seconds and accepts the token (else a clear
    error, exit status 2). Costs the database the token's check only."""
    deadline, backoff = time.monotonic() + wait, Backoff()
    while True:
        try:
            return api.call("hello", {}, retry=True)
        except Refused as exc:
            raise errors.Unauthorized(str(exc)) from exc
        except Unreachable as exc:
            if time.monotonic() >= deadline:
                raise errors.BadInput(f"cannot reach the API: {exc}") from exc
            time.sleep(min(backoff.next(), max(deadline - time.monotonic(), 0.01)))


# -- the runner's operations -----------------------------------------------------------------


class HttpChannel:
    """``Channel`` over HTTP. Cheap: it holds nothing but the shared Api."""

    def __init__(self, api: Api) -> None:
        self.api = api

    closed = False

    def close(self) -> None:
        pass

    def register(
        self, name: str, *, host: str, pid: int, slots: int, dead_after: float, max_losses: int
    ) -> tuple[str, FinishReport]:
        data = self.api.call(
            "register",
            {
                "runner": name,
                "host": host,
                "pid": pid,
                "slots": slots,
                "dead_after": dead_after,
                "max_losses": max_losses,
            },
        )
        return data["runner"], report_from(data["report"])

    def beat(
        self,
        name: str,
        host: str,
        pid: int,
        counts: dict[str, int],
        *,
        draining: bool = False,
        job_ids: Sequence[int] = (),
        lease: float = 300.0,
    ) -> Beat:
        data = self.api.call(
            "heartbeat",
            {
                "runner": name,
                "host": host,
                "pid": pid,
                "counts": counts,
                "draining": draining,
                "jobs": list(job_ids),
                "lease": lease,
            },
        )
        return Beat(ours=data["ours"], cancel=data["cancel"])

    def cycle(
        self,
        name: str,
        outcomes: list[Outcome],
        *,
        claim_n: int = 0,
        lease: float = 300.0,
        scope: Scope = ANYWHERE,
        close: Iterable[int] = (),
        recheck: Iterable[int] = (),
        defer_settle: bool = True,
    ) -> FinishReport:
        """Outcomes go in parts of at most MAX_REQUEST_BYTES; the last part claims. Sent as
        ``batch`` (plain successes grouped, claimed jobs as rows), or as ``cycle`` to an API
        of an earlier version, which does not know ``batch`` (404: nothing was done)."""
        done, plain, rest = outcomes_wire(outcomes)
        encoded = [outcome_json(o) for o in rest]
        parts, part, size = [], [], 0
        for item in encoded:
            length = len(item.get("log_tail") or "") + len(json.dumps(item.get("result")))
            if part and size + length > MAX_REQUEST_BYTES:
                parts.append(part)
                part, size = [], 0
            part.append(item)
            size += length
        parts.append(part)
        total = FinishReport()
        for i, chunk in enumerate(parts):
            last = i == len(parts) - 1
            body = {
                "runner": name,
                "outcomes": chunk,
                "claim": claim_n if last else 0,
                "lease": lease,
                "workflow_id": scope.workflow_id,
                "model_run_id": scope.model_run_id,
                "close": list(close) if last else [],
                "recheck": sorted(recheck) if last else [],
                "defer_settle": defer_settle,
            }
            first = plain if i == 0 else []
            report = report_from(self._cycle(body, done if i == 0 else [], first))
            total.recorded += report.recorded
            total.became_ready += report.became_ready
            total.claimed += report.claimed
            total.finished_workflows.update(report.finished_workflows)
            total.unsettled |= report.unsettled
        return total

    def _cycle(self, body: dict[str, Any], done: list, plain: list[Outcome]) -> Any:
        """``batch`` with the grouped successes; ``cycle`` with them as objects."""
        if self.api.batches:
            try:
                return self.api.call("batch", {**body, "done": done})
            except errors.Error as exc:
                if getattr(exc, "status", None) != 404:
                    raise
                self.api.batches = False
        outcomes = [outcome_json(o) for o in plain] + body["outcomes"]
        return self.api.call("cycle", {**body, "outcomes": outcomes})

    def reconnect(self, name: str, host: str, pid: int, known: list[int]) -> FinishReport | None:
        data = self.api.call(
            "reconnect", {"runner": name, "host": host, "pid": pid, "known": known}, retry=True
        )
        return None if data is None else report_from(data)

    def rescue(
        self, name: str, *, dead_after: float, max_losses: int
    ) -> tuple[list[str], FinishReport]:
        data = self.api.call(
            "rescue",
            {"runner": name, "dead_after": dead_after, "max_losses": max_losses},
            retry=True,
        )
        return data["lost"], report_from(data["report"])

    def set_state(self, name: str, host: str, pid: int, state: str) -> None:
        self.api.call(
            "state", {"runner": name, "host": host, "pid": pid, "state": state}, retry=True
        )

    def finished(self, scope: Scope) -> str | None:
        body = {"workflow_id": scope.workflow_id, "model_run_id": scope.model_run_id}
        return self.api.call("finished", body, retry=True)["status"]

    def anything_unfinished(self) -> bool:
        return self.api.call("unfinished", {}, retry=True)["unfinished"]

    def next_retry(self) -> float | None:
        return self.api.call("next_retry", {}, retry=True)["seconds"]

    def wait(self, after: str | None, timeout: float) -> dict[str, Any]:
        """Until work may be ready (or ``timeout``): the API's one LISTEN answers for all the
        runners waiting on it, without a query. ``after``: the token of the last answer, so
        that nothing notified between two waits is missed."""
        return self.api.call(
            "wait", {"after": after, "timeout": timeout}, retry=True, timeout=timeout + 15
        )


class HttpTransport:
    """Runners that reach only the API. Every thread's channel shares one Api."""

    listens = False  # waits for work through HttpChannel.wait instead

    def __init__(self, api: Api) -> None:
        self.api = api

    def connect(self) -> HttpChannel:
        return HttpChannel(self.api)


# -- files -----------------------------------------------------------------------------------


class HttpData:
    """A runner's files through the API (smifdb.files): each call retried with backoff
    through an outage of the API for up to DATA_PATIENCE, so a restart fails no attempt."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def _patiently(self, fn: Any) -> Any:
        deadline, backoff = time.monotonic() + DATA_PATIENCE, Backoff()
        while True:
            try:
                return fn()
            except Unreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(backoff.next())

    def job_inputs(
        self, workflow_id: int, *, files: bool, inputs: Sequence[str]
    ) -> list[tuple[str, FileEntry]]:
        body = {"workflow_id": workflow_id, "files": files, "inputs": list(inputs)}
        data = self._patiently(lambda: self.api.call("job_inputs", body, retry=True))
        return [(under, entry_from(e)) for under, e in data]

    def model_run_inputs(self, model_run_id: int) -> tuple[list[FileEntry], list[FileEntry]]:
        body = {"model_run_id": model_run_id}
        data = self._patiently(lambda: self.api.call("model_run_inputs", body, retry=True))
        return [entry_from(e) for e in data["project"]], [entry_from(e) for e in data["results"]]

    def missing(self, shas: Sequence[str]) -> set[str]:
        body = {"sha256": list(shas)}
        return set(self._patiently(lambda: self.api.call("missing", body, retry=True)))

    def download(self, sha256: str, dest: Path, mode: int) -> None:
        """Into a temporary file beside ``dest``, hash-checked, then renamed into place."""
        self._patiently(lambda: self._download(sha256, Path(dest), mode))

    def _download(self, sha256: str, dest: Path, mode: int) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            digest = hashlib.sha256()
            with (
                os.fdopen(fd, "wb") as f,
                self.api.request("GET", f"blobs/{sha256}", None, {}, retry=True) as resp,
            ):
                while chunk := resp.read(CHUNK_BYTES):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != sha256:
                raise Unreachable(f"blob {sha256} arrived incomplete or changed; fetching again")
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def upload(self, path: Path, sha256: str, size: int) -> None:
        def send() -> None:
            with (
                open(path, "rb") as f,
                self.api.request(
                    "PUT",
                    f"blobs/{sha256}",
                    f,
                    {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    retry=True,
                    timeout=max(TIMEOUT, size / 2**20),  # at least 1 MiB/s
                ),
            ):
                pass

        self._patiently(send)

    def close(self) -> None:
        pass
