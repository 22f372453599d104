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


CONVERGE_TARGETS = {"north": 1.0, "south": 2.0, "east": 4.0}


def converge_decision(history: list[dict], tolerance: float = 0.01) -> dict | None:
    """A generic decision loop (``--decide smifdb.examples:converge_decision``).

    Each bundle steps three independent regional models towards their targets, in parallel;
    the loop ends once every region's last step changed its value by less than ``tolerance``.
    """
    if history:
        last = history[-1]["results"]
        if all(r["change"] < tolerance for r in last.values()):
            return None
        values = {key: r["value"] for key, r in last.items()}
    else:
        values = dict.fromkeys(CONVERGE_TARGETS, 0.0)
    return {
        "jobs": [
            {
                "key": region,
                "python": "smifdb.examples:converge",
                "args": {"value": values[region], "target": target},
            }
            for region, target in CONVERGE_TARGETS.items()
        ]
    }
