"""procrastinate's side of benchmarks/throughput.py (procrastinate from PyPI: pip install
procrastinate; it runs on psycopg 3, as smifdb does).

python procrastinate_worker.py install DSN
python procrastinate_worker.py enqueue DSN N
python procrastinate_worker.py work DSN CONCURRENCY   # drains the queue, then exits
"""

from __future__ import annotations

import asyncio
import logging
import sys

from procrastinate import App, PsycopgConnector


def make_app(dsn: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app


async def install(dsn: str) -> None:
    app = make_app(dsn)
    async with app.open_async():
        installed = await app.connector.execute_query_one_async(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS installed"
        )
        if not installed["installed"]:
            await app.schema_manager.apply_schema_async()


async def enqueue(dsn: str, n: int) -> None:
    app = make_app(dsn)
    task = app.tasks["noop"]
    chunk = 10_000
    async with app.open_async():
        for start in range(0, n, chunk):
            await task.batch_defer_async(*([{}] * min(chunk, n - start)))


async def work(dsn: str, concurrency: int) -> None:
    app = make_app(dsn)
    async with app.open_async():
        await app.run_worker_async(
            concurrency=concurrency,
            wait=False,  # exit once the queues are empty
            install_signal_handlers=False,
            fetch_job_polling_interval=0.5,
        )


if __name__ == "__main__":
    # Not its warning that the app lives in __main__ (true, and harmless here) on every run.
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    command, dsn, *rest = sys.argv[1:]
    if command == "install":
        asyncio.run(install(dsn))
    elif command == "enqueue":
        asyncio.run(enqueue(dsn, int(rest[0])))
    else:
        asyncio.run(work(dsn, int(rest[0])))
