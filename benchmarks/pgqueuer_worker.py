"""pgqueuer's side of benchmarks/throughput.py (pgqueuer from PyPI: pip install "pgqueuer[asyncpg]").

python pgqueuer_worker.py install DSN
python pgqueuer_worker.py enqueue DSN N
python pgqueuer_worker.py work DSN BATCH      # drains the queue, then exits
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta

import asyncpg
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode


async def install(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    if not await queries.schema_is_installed():
        await queries.install()
    await conn.close()


async def enqueue(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    chunk = 10_000
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
    await conn.close()


async def work(dsn: str, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: object) -> None:
        return None

    await qm.run(
        batch_size=batch,
        mode=QueueExecutionMode.drain,
        dequeue_timeout=timedelta(seconds=1),
        log_aggregation_interval=timedelta(0),
    )
    await conn.close()


if __name__ == "__main__":
    command, dsn, *rest = sys.argv[1:]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if command == "install":
        asyncio.run(install(dsn))
    elif command == "enqueue":
        asyncio.run(enqueue(dsn, int(rest[0])))
    else:
        asyncio.run(work(dsn, int(rest[0])))
