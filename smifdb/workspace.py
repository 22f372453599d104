"""An attempt's private folder: its input files in, its output files out.

A job with files runs in a fresh folder per attempt, so two attempts (a retry, or a rescued
attempt whose runner was only slow) never see each other's half-written files. Inputs come from
the runner's cache (smifdb.cache); outputs are the files its globs match once it succeeded,
refused if they lie outside the folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smifdb import errors

MAX_OUTPUT_FILES = 100_000  # files one job may store


class OutputError(errors.BadInput):
    """A job's outputs cannot be stored as its spec says."""


@dataclass(frozen=True)
class Pattern:
    glob: str
    optional: bool = False

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> Pattern:
        return cls(raw["glob"], bool(raw.get("optional", False)))


def pattern_problem(text: Any) -> str | None:
    """Why an output glob cannot be used, or None: relative, inside the job's folder."""
    if not isinstance(text, str) or not text.strip():
        return "must be a non-empty string"
    if "\0" in text:
        return "must not contain NUL"
    if text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":"):
        return f"{text!r} is absolute: give a path relative to the job's folder"
    if ".." in Path(text).parts:
        return f"{text!r} leaves the job's folder ('..')"
    return None


def fresh_folder(root: Path, name: str) -> Path:
    """``root/name``, empty and private to the runner's user."""
    folder = root / name
    remove(folder)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700)
    return folder


def remove(folder: Path) -> None:
    """Remove a job's folder, whatever the job left in it (read-only folders too)."""

    def writable(func: Any, path: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(path)

    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(folder, onexc=writable)
        else:  # onerror: the same call, deprecated from 3.12
            shutil.rmtree(folder, onerror=writable)


def collect(folder: Path, patterns: Sequence[Pattern]) -> list[tuple[str, Path, int]]:
    """The files the patterns match, as (path relative to ``folder``, file, mode).

    A folder matched stands for every file under it. A symlink is stored as the file it points
    to if that lies inside the folder; one pointing out is refused, as is a pattern matching
    nothing unless it is optional.
    """
    root = folder.resolve()
    found: dict[str, tuple[Path, int]] = {}
    for pattern in patterns:
        if problem := pattern_problem(pattern.glob):
            raise OutputError(f"output {problem}")
        matches = sorted(glob.glob(pattern.glob, root_dir=root, recursive=True))
        before = len(found)
        for match in matches:
            _add(root, root / match, found)
        if len(found) == before and not matches and not pattern.optional:
            raise OutputError(
                f"output {pattern.glob!r} matched no file in the job's folder (mark it "
                "optional to allow that: {glob: ..., optional: true})"
            )
        if len(found) > MAX_OUTPUT_FILES:
            raise OutputError(f"the job's outputs are more than {MAX_OUTPUT_FILES} files")
    return [(rel, path, mode) for rel, (path, mode) in sorted(found.items())]


def _add(root: Path, path: Path, found: dict[str, tuple[Path, int]]) -> None:
    real = path.resolve()
    if real != root and root not in real.parents:
        raise OutputError(
            f"output {path.relative_to(root)} points outside the job's folder (to {real})"
        )
    st = real.stat()
    if stat.S_ISDIR(st.st_mode):
        for dirpath, _dirs, files in os.walk(path):
            for name in sorted(files):
                _add(root, Path(dirpath) / name, found)
        return
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {path.relative_to(root)} is not a regular file")
    rel = path.relative_to(root).as_posix()
    found[rel] = (real, 0o755 if st.st_mode & 0o111 else 0o644)
