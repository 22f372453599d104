"""Blob store throughput: a big file through put_file/get_file against a bare COPY of its bytes.

    python benchmarks/blobs.py [--dsn DSN] [--mib 1024] [--repeat 1]

One run, one database (a new local cluster with durable commits unless --dsn is given), one
file of MIB MiB of random bytes (incompressible, like most model data). Side by side:

- bare upload: the file's bytes COPYed (binary, 1 MiB rows) into a plain ``bytea`` table, in
  one transaction: the bound for any upload through PostgreSQL. Twice: into a table with
  EXTERNAL storage (as blob_chunks has) and one with the default (EXTENDED: pglz is tried on
  every value), to measure what skipping pglz saves;
- store upload: ``blobs.put_file`` with the hash given (as put_tree passes it), so both sides
  read the file once; it also hashes what it sends;
- bare download: ``COPY (SELECT data …) TO STDOUT`` written to a file;
- store download: ``blobs.get_file`` (READ_AHEAD chunks per query, hash checked, a temporary
  file renamed into place).

Printed: MB/s of each, the store's ratio to the bare bound (target ≥ 0.5), TOAST sizes of the
two bare tables, and the process's peak RSS (ru_maxrss) before and after: flat memory means
it does not grow with --mib.
"""

from __future__ import annotations

import hashlib
import os
import resource
import struct
import tempfile
import time
from pathlib import Path

import psycopg
from common import database, machine, parser

from smifdb.store import blobs

MiB = 1 << 20

BARE_TABLES = {
    "bare_external": "ALTER TABLE bare_external ALTER COLUMN data SET STORAGE EXTERNAL",
    "bare_extended": None,  # the default storage: pglz is tried on each value
}
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_ROW = struct.Struct("!hiii")  # 2 fields: seq (int4), data length
_TRAILER = struct.pack("!h", -1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def bare_upload(conn: psycopg.Connection, table: str, path: Path) -> float:
    started = time.perf_counter()
    copy_in = f"COPY {table} (seq, data) FROM STDIN (FORMAT BINARY)"
    with (
        conn.transaction(),
        open(path, "rb") as f,
        conn.cursor() as cur,
        cur.copy(copy_in) as copy,
    ):
        copy.write(_HEADER)
        seq = 0
        while chunk := f.read(MiB):
            copy.write(_ROW.pack(2, 4, seq, len(chunk)))
            copy.write(chunk)
            seq += 1
        copy.write(_TRAILER)
    return time.perf_counter() - started


def bare_download(conn: psycopg.Connection, table: str, dest: Path) -> float:
    started = time.perf_counter()
    with open(dest, "wb") as f, conn.cursor() as cur:
        query = f"COPY (SELECT data FROM {table} ORDER BY seq) TO STDOUT (FORMAT BINARY)"
        with cur.copy(query) as copy:
            for block in copy:  # the binary COPY stream, framing included: a bound
                f.write(block)
    return time.perf_counter() - started


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="file size in MiB (default 1 GiB)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the best of each is kept")
    args = p.parse_args()
    mb = args.mib * MiB / 1e6
    with database(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="smifdb-bench-") as tmp:
        print(machine(dsn))
        src = Path(tmp) / "src.bin"
        sha = make_file(src, args.mib)
        rss_before = peak_rss_mib()
        best: dict[str, float] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table, storage in BARE_TABLES.items():
                conn.execute(f"CREATE TABLE {table} (seq int PRIMARY KEY, data bytea NOT NULL)")
                if storage:
                    conn.execute(storage)
            for _ in range(args.repeat):
                times = {}
                for table in BARE_TABLES:
                    conn.execute(f"TRUNCATE {table}")
                    times[f"bare upload ({table})"] = bare_upload(conn, table, src)
                conn.execute("DELETE FROM blob_chunks")
                conn.execute("DELETE FROM blobs")
                times["store upload (put_file)"] = timed(blobs.put_file, conn, src, sha256=sha)
                times["bare download"] = bare_download(conn, "bare_external", Path(tmp) / "b")
                os.unlink(Path(tmp) / "b")
                dest = Path(tmp) / "dest.bin"
                times["store download (get_file)"] = timed(blobs.get_file, conn, sha, dest)
                assert blobs.hash_file(dest) == (sha, args.mib * MiB)
                os.unlink(dest)
                for name, seconds in times.items():
                    best[name] = min(best.get(name, seconds), seconds)
            toast = {
                table: conn.execute(
                    "SELECT pg_table_size(%s::regclass) - pg_relation_size(%s::regclass)",
                    [table, table],
                ).fetchone()[0]
                for table in BARE_TABLES
            }
            for table in BARE_TABLES:
                conn.execute(f"DROP TABLE {table}")
        print(f"{args.mib} MiB ({mb:,.0f} MB) of random bytes, best of {args.repeat}:")
        for name, seconds in best.items():
            print(f"  {name:<30} {seconds:7.2f} s  {mb / seconds:8.1f} MB/s")
        up = best["bare upload (bare_external)"] / best["store upload (put_file)"]
        down = best["bare download"] / best["store download (get_file)"]
        pglz = best["bare upload (bare_extended)"] / best["bare upload (bare_external)"]
        print(f"  store/bare: upload {up:.2f}x, download {down:.2f}x (target >= 0.5x)")
        print(f"  EXTENDED (pglz tried) upload takes {pglz:.2f}x the time of EXTERNAL")
        for table, size in toast.items():
            print(f"  TOAST of {table}: {size / MiB:,.1f} MiB")
        print(f"  peak RSS: {rss_before:.0f} MiB before the transfers, {peak_rss_mib():.0f} after")


if __name__ == "__main__":
    main()
