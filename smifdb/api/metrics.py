"""Prometheus metrics at /metrics, read from the database on each scrape.

The API keeps no state and runs as many copies as you like, so what the queue holds is never
counted in process memory: each scrape reads one snapshot (smifdb.store.metrics) and renders
it through a collector in a registry made for that request. The one exception is about the
process itself: how many runner-protocol requests it has answered, by operation
(``smifdb_api_runner_requests_total``), as each scraped process's own counter. Runners need not be reachable. When the
database is not, the answer is still 200 with ``smifdb_up 0``, as Prometheus exporters do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import psycopg
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from psycopg_pool import PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smifdb.states import RUNNER_STATES
from smifdb.store import metrics as rows

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # seconds to wait for a pooled connection: well inside a scrape timeout
# How an attempt ended: the status its job went to, or requeued (back to ready: a retry, a
# release at shutdown, a rescue from a dead runner).
OUTCOMES = ("succeeded", "failed", "cancelled", "requeued")
LIVE = ("active", "draining")


class SnapshotCollector:
    """Metric families for one snapshot (None: the database did not answer)."""

    def __init__(self, snap: rows.Snapshot | None, seconds: float) -> None:
        self.snap, self.seconds = snap, seconds

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield GaugeMetricFamily(
            "smifdb_up", "1 if the database answered this scrape, else 0", float(snap is not None)
        )
        yield GaugeMetricFamily(
            "smifdb_scrape_duration_seconds",
            "seconds spent reading the database for this scrape",
            self.seconds,
        )
        if snap is None:
            return
        yield _by("smifdb_jobs", "jobs by status", "status", snap.jobs)
        yield _by("smifdb_workflows", "workflows by status", "status", snap.workflows)
        yield GaugeMetricFamily(
            "smifdb_oldest_ready_job_age_seconds",
            "seconds the longest-waiting due ready job has been ready (0: none)",
            snap.oldest_ready_age or 0.0,
        )
        states = {s: 0 for s in RUNNER_STATES}
        for r in snap.runners:
            states[r.state] += 1
        yield _by(
            "smifdb_runners", "runners by state (lost: silent for dead_after)", "state", states
        )
        yield from _per_runner([r for r in snap.runners if r.recent])
        yield GaugeMetricFamily(
            "smifdb_events_window_seconds",
            "seconds of newest events behind the per-second rates and the duration histogram",
            snap.window,
        )
        yield GaugeMetricFamily(
            "smifdb_job_claims_per_second",
            "jobs claimed per second over the events window",
            snap.claims / snap.window,
        )
        ended = dict.fromkeys(OUTCOMES, 0)
        for status, n in snap.attempts_ended.items():
            ended[status if status in ended else "requeued"] += n
        yield _by(
            "smifdb_job_attempts_ended_per_second",
            "attempts ended per second over the events window, by outcome",
            "outcome",
            {o: n / snap.window for o, n in ended.items()},
        )
        durations = GaugeHistogramMetricFamily(
            "smifdb_job_duration_seconds",
            "durations of final attempts that ended in the events window (not cumulative)",
            labels=["status"],
        )
        for status, d in snap.durations.items():
            cumulative, buckets = 0, []
            for bound, n in zip((*rows.DURATION_BUCKETS, "+Inf"), d.counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            durations.add_metric([status], buckets, d.total)
        yield durations


def _by(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _per_runner(runners: list[rows.Runner]) -> Iterator[Metric]:
    """Series for runners that are live or were seen in the last hour: bounded cardinality,
    though every default-named runner (HOST-PID) leaves a row behind."""
    slots = GaugeMetricFamily("smifdb_runner_slots", "a live runner's slots", labels=["runner"])
    busy = GaugeMetricFamily(
        "smifdb_runner_busy_slots", "a live runner's running jobs", labels=["runner"]
    )
    age = GaugeMetricFamily(
        "smifdb_runner_heartbeat_age_seconds",
        "seconds since a runner's last heartbeat",
        labels=["runner"],
    )
    attempts = CounterMetricFamily(
        "smifdb_runner_attempts",
        "attempts a runner recorded as succeeded or failed (written at each heartbeat)",
        labels=["runner", "outcome"],
    )
    claims = CounterMetricFamily(
        "smifdb_runner_claims",
        "jobs a runner claimed (written at each heartbeat)",
        labels=["runner"],
    )
    for r in runners:
        if r.state in LIVE:  # capacity: sum(busy) / sum(slots) is the utilisation
            slots.add_metric([r.name], r.slots)
            busy.add_metric([r.name], r.busy)
        if r.heartbeat_age is not None:
            age.add_metric([r.name], r.heartbeat_age)
        attempts.add_metric([r.name, "succeeded"], r.jobs_succeeded)
        attempts.add_metric([r.name, "failed"], r.jobs_failed)
        claims.add_metric([r.name], r.jobs_claimed)
    yield from (slots, busy, age, attempts, claims)


class RequestsCollector:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "smifdb_api_runner_requests",
            "runner-protocol requests this API process has answered, by operation",
            labels=["op"],
        )
        for op, n in sorted(self.counts.items()):
            family.add_metric([op], n)
        yield family


def read(request: Request) -> tuple[rows.Snapshot | None, float]:
    """A snapshot and the seconds it took; None if the database could not be read."""
    start = time.perf_counter()
    try:
        with request.app.state.pool.connection(timeout=CONNECT_TIMEOUT) as conn:
            snap = rows.snapshot(conn, dead_after=request.app.state.dead_after)
    except (psycopg.Error, PoolTimeout) as exc:
        log.warning("metrics: database unreadable: %s", exc)
        snap = None
    return snap, time.perf_counter() - start


async def metrics(request: Request) -> Response:
    snap, seconds = await run_in_threadpool(read, request)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap, seconds))
    registry.register(RequestsCollector(dict(request.app.state.runner_requests)))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(
        encode(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


ROUTES = [Route("/metrics", metrics)]
