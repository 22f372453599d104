"""One LISTEN per API process, for every runner waiting on it (the runner protocol's wait).

A waiting runner costs a coroutine here and nothing in the database: the thread below holds
the process's one listening connection and, on each notification of ready work, a cancel or
a finished workflow, wakes every waiter. Retries become ready by time, not by a NOTIFY, so it
also asks once every RETRY_CHECK seconds when the next one is due, for all waiters at once.

Answers carry a token (this process's epoch and a count of wake-ups): a runner sends back the
last one, and is answered at once if anything happened since, so nothing that fell between
two of its waits is missed; a token of another process (after a failover) also answers at
once. The listener starts with the first wait, so an API serving no runners holds no
connection for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from typing import Any

from smifdb import db, store
from smifdb.db import DB_ERRORS, Backoff
from smifdb.store import CANCEL_CHANNEL, FINISHED_CHANNEL, READY_CHANNEL, queue

log = logging.getLogger("smifdb.api")
RETRY_CHECK = 5.0  # seconds between asking when the next retry is due


class Wakeup:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.epoch = secrets.token_hex(6)
        self.seq = 0  # wake-ups so far
        self.cancel_seq = 0  # the last wake-up that carried a cancel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def token(self) -> str:
        return f"{self.epoch}:{self.seq}"

    async def wait(self, after: str | None, timeout: float) -> dict[str, Any]:
        """Return when something happened after ``after`` (at once if it already has), or
        after ``timeout`` seconds with ``woken`` false."""
        self._start()
        assert self._event is not None
        epoch, _, count = (after or "").partition(":")
        seen = int(count) if epoch == self.epoch and count.isdigit() else None
        if seen is None or seen != self.seq:
            cancel = seen is None or self.cancel_seq > seen
            return {"token": self.token(), "woken": after is not None, "cancel": cancel}
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return {"token": self.token(), "woken": False, "cancel": False}
        return {"token": self.token(), "woken": True, "cancel": self.cancel_seq > seen}

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the listening thread ---------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        self._thread = threading.Thread(target=self._listen, name="wakeup", daemon=True)
        self._thread.start()

    def _bump(self, cancel: bool) -> None:
        """In the event loop: one wake-up for every waiter."""
        self.seq += 1
        if cancel:
            self.cancel_seq = self.seq
        assert self._event is not None
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _wake(self, cancel: bool) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is ending
            self._loop.call_soon_threadsafe(self._bump, cancel)

    def _listen(self) -> None:
        backoff, failing = Backoff(), False
        while not self._closed.is_set():
            try:
                with db.connect(
                    self.dsn, connect_timeout=5, application_name="smifdb api wakeup"
                ) as conn:
                    store.listen(conn, READY_CHANNEL, CANCEL_CHANNEL, FINISHED_CHANNEL)
                    self._wake(cancel=True)  # anything may have happened while not listening
                    if failing:
                        log.warning("runner wake-ups: listening again")
                    backoff.reset()
                    failing = False
                    self._serve(conn)
            except DB_ERRORS as exc:
                if not failing:
                    log.warning("runner wake-ups: lost the listening connection: %s", exc)
                    failing = True
                self._closed.wait(backoff.next())

    def _serve(self, conn: Any) -> None:
        next_check, due_at = 0.0, float("inf")
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= due_at:
                self._wake(cancel=False)
                next_check = now  # and ask for the one after
            if now >= next_check:
                due = queue.seconds_until_next_retry(conn)
                due_at = now + due if due is not None else float("inf")
                next_check = now + RETRY_CHECK
            timeout = max(min(0.5, due_at - now, next_check - now), 0.01)
            for note in conn.notifies(timeout=timeout):
                self._wake(note.channel == CANCEL_CHANNEL)
