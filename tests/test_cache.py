"""A runner's cache under its size cap: real files, hard links and a real process holding a
folder, no database (the blobs come from a local fetch)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from smifdb.cache import FOLDER_LOCK, Cache
from smifdb.store.blobs import FileEntry

MB = 1 << 20


def blob(tmp: Path, name: str, size: int) -> tuple[FileEntry, bytes]:
    data = os.urandom(size)
    return FileEntry(f"data/{name}", hashlib.sha256(data).hexdigest(), size), data


def fetcher(contents: dict[str, bytes]):
    def fetch(sha256: str, dest: Path, mode: int) -> None:
        dest.write_bytes(contents[sha256])
        os.chmod(dest, mode)

    return fetch


def folder_of(cache: Cache, name: str, entries: list[FileEntry], fetch, used: float) -> Path:
    """A kind's folder of links (as the smif kind makes a project), last used at ``used``."""
    folder = cache.folders / name
    folder.mkdir(parents=True)
    with cache.holding(entries, fetch):
        cache.materialise(entries, folder)
    os.utime(folder, (used, used))
    return folder


def hold(folder: Path) -> subprocess.Popen:
    """Another process that uses ``folder``, as a running attempt does: LOCK_SH on its lock."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder / FOLDER_LOCK)], stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"held\n"
    return proc


def test_eviction_removes_the_least_recently_used_folder_not_one_in_use(tmp_path) -> None:
    old, old_data = blob(tmp_path, "old.bin", 3 * MB)
    new, new_data = blob(tmp_path, "new.bin", 3 * MB)
    fetch = fetcher({old.sha256: old_data, new.sha256: new_data})
    cache = Cache(tmp_path / "cache", max_bytes=100 * MB)
    now = time.time()
    a = folder_of(cache, "1-a", [old], fetch, used=now - 3600)
    b = folder_of(cache, "2-b", [new], fetch, used=now)
    # A folder of links costs nothing beyond its objects: 6 MB here, each inode counted once.
    assert cache.evict() == 0
    cache.max_bytes = 4 * MB  # less than the two projects: the older one goes
    holder = hold(b)
    try:
        assert cache.evict() == 3 * MB
        assert not a.exists() and not cache.path(old).exists()  # its object freed with it
        assert b.is_dir() and cache.path(new).exists()
        assert not list(cache.folders.glob(".stale-*"))
        # Under a cap smaller than what is in use, what is in use stays.
        cache.max_bytes = MB
        assert cache.evict() == 0
        assert (b / "data/new.bin").read_bytes() == new_data and cache.path(new).exists()
    finally:
        holder.kill()
        holder.wait()
    # Nothing fetched since it ended over the cap: no rescan (a walk of every folder) yet.
    assert cache.evict() == 0
    # Once its last user ended (here: was SIGKILLed, so the kernel dropped its lock), the next
    # fetch makes room: the folder goes, with its object; what was just fetched stays.
    third, third_data = blob(tmp_path, "third.bin", MB // 2)
    cache.ensure([third], fetcher({third.sha256: third_data}))
    assert not b.exists() and not cache.path(new).exists()
    assert cache.path(third).exists()


def test_an_object_linked_from_a_folder_is_kept_and_pinned_objects_stay(tmp_path) -> None:
    linked, linked_data = blob(tmp_path, "linked.bin", 2 * MB)
    loose, loose_data = blob(tmp_path, "loose.bin", 2 * MB)
    fresh, fresh_data = blob(tmp_path, "fresh.bin", 2 * MB)
    fetch = fetcher(
        {linked.sha256: linked_data, loose.sha256: loose_data, fresh.sha256: fresh_data}
    )
    cache = Cache(tmp_path / "cache", max_bytes=100 * MB)
    folder = folder_of(cache, "1-p", [linked], fetch, used=time.time())
    cache.ensure([loose], fetch)
    past = time.time() - 3600
    for entry in (linked, loose):  # both objects older than the folder's last use
        os.utime(cache.path(entry), (past, past))
    holder = hold(folder)
    try:
        cache.max_bytes = 3 * MB
        with cache.holding([fresh], fetch):  # fetched for a link not made yet: pinned
            assert cache.path(fresh).exists()
        # Removing the linked object would free nothing while the folder lives: the loose one
        # goes, and the fresh one, pinned while it was being placed, stayed.
        assert not cache.path(loose).exists()
        assert cache.path(linked).exists() and cache.path(fresh).exists()
    finally:
        holder.kill()
        holder.wait()
