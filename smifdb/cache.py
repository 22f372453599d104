"""A runner's local copy of blobs, so a file many jobs need is fetched once per machine.

Objects live at ``ROOT/objects/<first two hex digits>/<sha256>`` (``…/<sha256>.x`` for an
executable copy), complete or absent: each is fetched into a temporary name, verified against
its hash by the blob store, and renamed into place. Jobs' folders get hard links to them (a copy
where the file system refuses a link), so materialising a big input is a link, not a read.

A job may write through a link into the cache's object. Objects are read-only and carry a
fixed mtime; one found with another mtime or size was written to, and is fetched again before
it is linked anywhere else. The cache keeps under its size cap by evicting the least recently
used objects (their access times); a job folder holding a link keeps its data until it goes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from smifdb import errors
from smifdb.store.blobs import FileEntry

# An object's mtime, in ns since the epoch: anything else means it was written to.
PRISTINE_MTIME_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09, before any job ran
DEFAULT_MAX_BYTES = 20 << 30

Fetch = Callable[[str, Path, int], None]  # (sha256, destination, mode): one verified blob


class CacheError(errors.Error):
    """A blob could not be made available on this machine (disk full, unreadable cache)."""

    status = 507


@dataclass
class _Usage:
    bytes: int = 0
    scanned: bool = False


class Cache:
    """Content-addressed files on one machine; thread-safe, and shared safely by processes."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._usage = _Usage()

    def path(self, entry: FileEntry) -> Path:
        suffix = ".x" if entry.mode & 0o111 else ""
        return self.objects / entry.sha256[:2] / f"{entry.sha256}{suffix}"

    # -- fetching ---------------------------------------------------------------------------

    def ensure(self, entries: Iterable[FileEntry], fetch: Fetch) -> None:
        """Every entry's object present and pristine, fetched with ``fetch`` if not."""
        for entry in _unique(entries):
            target = self.path(entry)
            with self._fetch_lock(target.name):
                if self._pristine(target, entry.size):
                    _touch(target)
                    continue
                self._fetch(entry, target, fetch)
        self.evict()

    def _fetch_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._fetching.setdefault(name, threading.Lock())

    def _pristine(self, target: Path, size: int) -> bool:
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if st.st_size == size and st.st_mtime_ns == PRISTINE_MTIME_NS:
            return True
        with contextlib.suppress(FileNotFoundError):  # written through a link: fetch anew
            target.unlink()
        return False

    def _fetch(self, entry: FileEntry, target: Path, fetch: Fetch) -> None:
        mode = 0o555 if entry.mode & 0o111 else 0o444
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fetch(entry.sha256, target, mode)
            os.utime(target, ns=(time.time_ns(), PRISTINE_MTIME_NS))
        except OSError as exc:
            with contextlib.suppress(OSError):
                target.unlink()
            why = "no space left on the device" if exc.errno == errno.ENOSPC else str(exc)
            raise CacheError(
                f"cannot store blob {entry.sha256} ({entry.size} bytes, for {entry.path}) in "
                f"the runner's cache {self.root}: {why}; free space there, or point --cache-dir "
                "elsewhere or lower --cache-max-bytes"
            ) from exc
        with self._lock:
            self._usage.bytes += entry.size

    # -- materialising ----------------------------------------------------------------------

    def materialise(self, entries: Iterable[FileEntry], folder: Path, under: str = "") -> None:
        """Link (or copy) each entry into ``folder/under/path``; ``ensure`` them first."""
        base = folder / under if under else folder
        for entry in entries:
            dest = base / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = self.path(entry)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()  # a file of the folder's other entries at the same path
            try:
                os.link(source, dest)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(source, dest)
                os.chmod(dest, 0o755 if entry.mode & 0o111 else 0o644)

    # -- size -------------------------------------------------------------------------------

    def evict(self) -> int:
        """Remove least recently used objects until the cache is under its cap; bytes freed."""
        with self._lock:
            if not self._usage.scanned:
                self._usage.bytes = sum(size for _, size, _ in self._scan())
                self._usage.scanned = True
            if self._usage.bytes <= self.max_bytes:
                return 0
            objects = sorted(self._scan(), key=lambda o: o[2])
            freed = 0
            total = sum(size for _, size, _ in objects)
            for path, size, _ in objects:
                if total - freed <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += size
            self._usage.bytes = total - freed
            return freed

    def _scan(self) -> list[tuple[Path, int, int]]:
        found = []
        if not self.objects.is_dir():
            return found
        for sub in self.objects.iterdir():
            for path in sub.iterdir() if sub.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    if not path.name.startswith("."):  # a fetch in progress (get_file)
                        found.append((path, st.st_size, st.st_atime_ns))
        return found


def _touch(path: Path) -> None:
    """Mark an object used now (its access time) without touching its pristine mtime."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), PRISTINE_MTIME_NS))


def _unique(entries: Iterable[FileEntry]) -> list[FileEntry]:
    seen: dict[tuple[str, bool], FileEntry] = {}
    for entry in entries:
        seen.setdefault((entry.sha256, bool(entry.mode & 0o111)), entry)
    return list(seen.values())
