"""Small Python jobs for examples, benchmarks and tests: ``python: smifdb.examples:noop``."""

from __future__ import annotations

import os
import time


def noop() -> None:
    """Does nothing: measures the queue, not the work."""


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def append(path: str, line: str) -> str:
    """Append one line atomically (O_APPEND), e.g. to count how often a job ran."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return line


def converge(value: float, target: float = 1.0, rate: float = 0.5) -> dict:
    """One step of an iteration that approaches ``target``."""
    new = value + (target - value) * rate
    return {"value": new, "change": abs(new - value)}
