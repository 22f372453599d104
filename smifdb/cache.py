"""A runner's local copy of blobs, so a file many jobs need is fetched once per machine.

Objects live at ``ROOT/objects/<first two hex digits>/<sha256>`` (``…/<sha256>.x`` for an
executable copy), complete or absent: each is fetched into a temporary name, verified against
its hash by the blob store, and renamed into place. Jobs' folders get hard links to them (a copy
where the file system refuses a link), so materialising a big input is a link, not a read.

A job may write through a link into the cache's object. Objects are read-only and carry a
fixed mtime; one found with another mtime or size was written to, and is fetched again before
it is linked anywhere else.

Kinds may keep whole folders of links here too (``ROOT/projects/<name>/``: a smif model run's
project, materialised once per machine). A folder is marked used by its mtime, and an attempt
that uses one holds ``flock(LOCK_SH)`` on its ``.lock`` file until it ends; eviction takes
``LOCK_EX | LOCK_NB`` before it removes one, so a folder in use is never removed (a SIGKILLed
runner's locks go with its process).

The cache keeps under its size cap by least recently used eviction of objects (by access time)
and folders (by mtime), counting each inode once: a folder of hard links costs nothing beyond
its objects, and an object linked from a folder (or a running job's folder) frees nothing, so it
is kept until the folder goes. Objects this runner is about to link are pinned. What is in use
stays even when it alone exceeds the cap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smifdb import errors, workspace
from smifdb.store.blobs import FileEntry

# An object's mtime, in ns since the epoch: anything else means it was written to.
PRISTINE_MTIME_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09, before any job ran
DEFAULT_MAX_BYTES = 20 << 30
FOLDERS = "projects"
FOLDER_LOCK = ".lock"  # in each folder: LOCK_SH while an attempt uses it
RESCAN_SECONDS = 60.0  # over the cap with all in use: rescan at most this often unless it changes

Fetch = Callable[[str, Path, int], None]  # (sha256, destination, mode): one verified blob


class CacheError(errors.Error):
    """A blob could not be made available on this machine (disk full, unreadable cache)."""

    status = 507


@dataclass
class _Usage:
    bytes: int = 0
    scanned: bool = False
    stuck: tuple[int, float] | None = None  # (bytes, when): eviction ended over the cap


class Cache:
    """Content-addressed files on one machine; thread-safe, and shared safely by processes."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.folders = self.root / FOLDERS
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._pins: Counter[Path] = Counter()  # objects fetched for a link not yet made
        self._usage = _Usage()

    def path(self, entry: FileEntry) -> Path:
        suffix = ".x" if entry.mode & 0o111 else ""
        return self.objects / entry.sha256[:2] / f"{entry.sha256}{suffix}"

    # -- fetching ---------------------------------------------------------------------------

    def ensure(self, entries: Iterable[FileEntry], fetch: Fetch) -> None:
        """Every entry's object present and pristine, fetched with ``fetch`` if not."""
        with self.holding(entries, fetch):
            pass

    @contextlib.contextmanager
    def holding(self, entries: Iterable[FileEntry], fetch: Fetch) -> Iterator[None]:
        """``ensure`` the entries, and keep this process's evictions off their objects until
        the block ends (until they are linked or copied where they are needed)."""
        unique = _unique(entries)
        paths = [self.path(entry) for entry in unique]
        with self._lock:
            self._pins.update(paths)
        try:
            for entry, target in zip(unique, paths, strict=True):
                with self._fetch_lock(target.name):
                    if self._pristine(target, entry.size):
                        _touch(target)
                        continue
                    self._fetch(entry, target, fetch)
            self.evict()
            yield
        finally:
            with self._lock:
                self._pins.subtract(paths)
                self._pins += Counter()  # drop the zeros

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

    # -- folders ----------------------------------------------------------------------------

    def use_folder(self, folder: Path) -> int | None:
        """Hold ``folder`` (one of ``folders``) against eviction and mark it used now; the
        descriptor to close when the attempt ends, or None if the folder is absent (or was
        just evicted: build it again)."""
        try:
            fd = os.open(folder / FOLDER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction moves it away
            try:
                same = os.stat(folder / FOLDER_LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.utime(folder)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def lock_new_folder(self, building: Path) -> int:
        """Hold a folder being built (before it is renamed into place) as ``use_folder`` does."""
        fd = os.open(building / FOLDER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def remove_folder(self, folder: Path) -> bool:
        """Remove ``folder`` unless an attempt uses it (or it is gone); whether it went."""
        try:
            fd = os.open(folder / FOLDER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            aside = folder.with_name(f".stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            folder.rename(aside)  # holders-to-be find it gone, and build it again
        except (BlockingIOError, FileNotFoundError):
            return False
        finally:
            os.close(fd)
        workspace.remove(aside)
        return True

    # -- size -------------------------------------------------------------------------------

    def evict(self) -> int:
        """Remove least recently used objects and folders not in use until the cache is under
        its cap; bytes freed."""
        with self._lock:
            if not self._usage.scanned:
                self._usage.bytes = self._measure(self._scan(), self._scan_folders())
                self._usage.scanned = True
            if self._usage.bytes <= self.max_bytes or self._stuck():
                return 0
            objects, folders = self._scan(), self._scan_folders()
            total = self._measure(objects, folders)
            refs: Counter[tuple[int, int]] = Counter(o.inode for o in objects)
            for folder in folders:
                refs.update(folder.inodes.keys())  # one reference per path, not its size
            sizes = {o.inode: o.size for o in objects}
            for folder in folders:
                sizes.update(folder.inodes)
            by_inode = {o.inode: o for o in objects}
            queue: list[tuple[int, int, str, object]] = []
            for o in objects:
                if o.links == 1 and o.path not in self._pins:
                    queue.append((o.used_ns, 1, str(o.path), o))
            queue += [(f.used_ns, 0, str(f.path), f) for f in folders]
            heapq.heapify(queue)
            freed = 0

            def drop(inode: tuple[int, int]) -> None:
                nonlocal freed
                refs[inode] -= 1
                if refs[inode] == 0:
                    freed += sizes[inode]

            while queue and total - freed > self.max_bytes:
                _, _, _, unit = heapq.heappop(queue)
                if isinstance(unit, _Object):
                    with contextlib.suppress(FileNotFoundError):
                        unit.path.unlink()
                        drop(unit.inode)
                elif self.remove_folder(unit.path):
                    for inode in unit.inodes:
                        drop(inode)
                        obj = by_inode.get(inode)
                        if obj is not None and refs[inode] == 1 and obj.path not in self._pins:
                            with contextlib.suppress(FileNotFoundError):
                                if obj.path.stat().st_nlink == 1:  # no job's folder links it
                                    heapq.heappush(queue, (obj.used_ns, 1, str(obj.path), obj))
            self._usage.bytes = total - freed
            over = self._usage.bytes > self.max_bytes
            self._usage.stuck = (self._usage.bytes, time.monotonic()) if over else None
            return freed

    def _stuck(self) -> bool:
        """Did the last eviction end over the cap, everything left in use, with nothing fetched
        since, not long ago? Then a scan (a walk of every folder) would most likely find nothing
        to remove: what is released meanwhile goes at the next fetch, or after RESCAN_SECONDS."""
        stuck = self._usage.stuck
        if stuck is None or stuck[0] != self._usage.bytes:
            return False
        return time.monotonic() - stuck[1] < RESCAN_SECONDS  # others' folders may be free now

    @staticmethod
    def _measure(objects: list[_Object], folders: list[_Folder]) -> int:
        """Bytes on disk: each inode once, however many of the cache's paths link it."""
        sizes = {o.inode: o.size for o in objects}
        for folder in folders:
            sizes.update(folder.inodes)
        return sum(sizes.values())

    def _scan(self) -> list[_Object]:
        found: list[_Object] = []
        if not self.objects.is_dir():
            return found
        for sub in self.objects.iterdir():
            for path in sub.iterdir() if sub.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    if not path.name.startswith("."):  # a fetch in progress (get_file)
                        inode = (st.st_dev, st.st_ino)
                        found.append(_Object(path, st.st_size, st.st_atime_ns, st.st_nlink, inode))
        return found

    def _scan_folders(self) -> list[_Folder]:
        """Kinds' folders (not ``.build-*`` or ``.stale-*`` ones: their owners remove them)."""
        found: list[_Folder] = []
        try:
            entries = list(os.scandir(self.folders))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            inodes: dict[tuple[int, int], int] = {}
            with contextlib.suppress(FileNotFoundError):
                used = entry.stat(follow_symlinks=False).st_mtime_ns
                for top, _dirs, names in os.walk(entry.path):
                    for name in names:
                        with contextlib.suppress(FileNotFoundError):
                            st = os.lstat(os.path.join(top, name))
                            inodes[(st.st_dev, st.st_ino)] = st.st_size
                found.append(_Folder(Path(entry.path), used, inodes))
        return found


@dataclass(frozen=True)
class _Object:
    path: Path
    size: int
    used_ns: int  # access time: the LRU clock
    links: int
    inode: tuple[int, int]


@dataclass(frozen=True)
class _Folder:
    path: Path
    used_ns: int  # mtime, set by use_folder
    inodes: dict[tuple[int, int], int]  # each file's inode and size


def _touch(path: Path) -> None:
    """Mark an object used now (its access time) without touching its pristine mtime."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), PRISTINE_MTIME_NS))


def _unique(entries: Iterable[FileEntry]) -> list[FileEntry]:
    seen: dict[tuple[str, bool], FileEntry] = {}
    for entry in entries:
        seen.setdefault((entry.sha256, bool(entry.mode & 0o111)), entry)
    return list(seen.values())
