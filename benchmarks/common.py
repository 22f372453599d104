"""Shared set-up for benchmarks: a database with durable commits, machine facts for the record."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
from collections.abc import Iterator

import psycopg

from smifdb import migrate
from smifdb.pgserver import ThrowawayCluster

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--dsn", help="use this database (it is migrated) instead of a new local cluster"
    )
    return p


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """``dsn`` migrated, or a new local cluster with durable commits (fsync on)."""
    if dsn:
        migrate.ensure_current(dsn)
        yield dsn
        return
    with ThrowawayCluster(settings=DURABLE) as fresh:
        migrate.ensure_current(fresh)
        yield fresh


def machine(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers')"
            ).fetchall()
        )
    cpu = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"PostgreSQL {version} over a unix socket, "
        + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    )


def layered_dag(jobs: int, edges: int, layers: int = 100, seed: int = 1) -> dict:
    """A random layered DAG: every edge goes from an earlier layer to a later one."""
    rng = random.Random(seed)
    per_layer = jobs // layers
    keys = [f"j{i}" for i in range(jobs)]
    after: list[set[str]] = [set() for _ in range(jobs)]
    placed = 0
    while placed < edges:
        child = rng.randrange(per_layer, jobs)
        layer = child // per_layer
        parent = rng.randrange(0, layer * per_layer)
        if keys[parent] not in after[child]:
            after[child].add(keys[parent])
            placed += 1
    return {
        "name": f"layered-{jobs}",
        "jobs": [
            {"key": keys[i], "python": "smifdb.examples:noop", "after": sorted(after[i])}
            for i in range(jobs)
        ],
    }
