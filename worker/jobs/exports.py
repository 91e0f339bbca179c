"""Order exports to files under `SALESDASH_DATA_DIR/exports/`, and their retention.

An export streams `COPY ... TO STDOUT` chunks straight into a hidden temporary file (Parquet: a row group per few
MB of CSV), so its memory stays flat whatever the range. The file is fsynced and then renamed to its final name,
which depends only on the job id: a run killed midway leaves no file under that name, and a second run of the
same job replaces the first one's file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import asyncpg

from db.queries.exports import EXPORT_COLUMNS, copy_orders, count_orders, export_snapshot
from worker.exportfiles import EXTENSIONS, ExportResult, export_name, is_export, is_temp, temp_name
from worker.progress import report_progress
from worker.registry import ExportFormat, get_task

PROGRESS_EVERY_S = 1.0
PARQUET_BATCH_BYTES = 4 << 20  # CSV bytes per Parquet row group (~60k orders)


class AtomicFile:
    """A file written under a hidden name of its own and renamed to `final` only once it is complete and on disk.
    It counts and hashes what it writes; pyarrow writes to it too (write, tell, flush, closed)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.with_name(temp_name(final.name))
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def closed(self) -> bool:
        return self._file is None or self._file.closed

    def write(self, data: bytes) -> int:
        assert self._file is not None, "write outside `async with`"
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    async def __aenter__(self) -> AtomicFile:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.temp.open("wb")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:  # cancelled (abort, time limit) or failed: the partial file goes
                await asyncio.to_thread(self._commit)
        finally:
            if self._file is not None:
                self._file.close()
            self.temp.unlink(missing_ok=True)

    def _commit(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.final)
        directory = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


class _Progress:
    """Counts the lines COPY sends and reports the fraction done at most once a second."""

    def __init__(self, ctx: dict[str, Any], total: int) -> None:
        self.ctx = ctx
        self.total = total
        self.lines = 0
        self.reported = float("-inf")
        self.pause_s = ctx["settings"].export_pause_ms / 1000

    async def advance(self, chunk: bytes) -> None:
        self.lines += chunk.count(b"\n")  # one line per order: no exported value holds a newline
        now = time.monotonic()
        if now - self.reported >= PROGRESS_EVERY_S:
            self.reported = now
            done = min(self.lines, self.total)
            fraction = done / self.total if self.total else 1.0
            await report_progress(self.ctx, fraction, f"{done:,} of {self.total:,} orders")
        if self.pause_s:
            await asyncio.sleep(self.pause_s)


class _ParquetSink:
    """CSV rows from COPY in, Parquet out: each ~4 MB of complete CSV lines becomes one row group."""

    def __init__(self, out: AtomicFile) -> None:
        import pyarrow as pa  # the optional `parquet` extra; ExportArgs refuses parquet without it
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        self._pa, self._pcsv = pa, pcsv
        schema = pa.schema(
            [
                ("id", pa.int64()),
                ("customer_id", pa.int64()),
                ("status", pa.string()),
                ("total_amount", pa.decimal128(14, 2)),  # numeric(14, 2), exact
                ("created_at", pa.timestamp("us", tz="UTC")),
                ("item_count", pa.int64()),
                ("units", pa.int64()),
            ]
        )
        assert tuple(schema.names) == EXPORT_COLUMNS
        self._read = pcsv.ReadOptions(column_names=schema.names)
        self._convert = pcsv.ConvertOptions(column_types=schema)
        self._writer = pq.ParquetWriter(out, schema)
        self._pending = bytearray()

    async def __call__(self, chunk: bytes) -> None:
        self._pending += chunk
        if len(self._pending) >= PARQUET_BATCH_BYTES:
            cut = self._pending.rindex(b"\n") + 1
            batch = bytes(self._pending[:cut])
            del self._pending[:cut]
            await asyncio.to_thread(self._write, batch)

    async def close(self) -> None:
        if self._pending:
            await asyncio.to_thread(self._write, bytes(self._pending))
            self._pending.clear()
        self._writer.close()

    def _write(self, csv_lines: bytes) -> None:
        table = self._pcsv.read_csv(
            self._pa.py_buffer(csv_lines), read_options=self._read, convert_options=self._convert
        )
        self._writer.write_table(table)


async def _copy_into(
    conn: asyncpg.Connection,
    args: tuple[datetime, datetime],
    export_format: ExportFormat,
    out: AtomicFile,
    progress: _Progress,
) -> int:
    if export_format == "parquet":
        parquet = _ParquetSink(out)

        async def to_parquet(chunk: bytes) -> None:
            await parquet(chunk)
            await progress.advance(chunk)

        rows = await copy_orders(conn, *args, "csv_rows", to_parquet)
        await parquet.close()
        return rows

    async def to_file(chunk: bytes) -> None:
        out.write(chunk)
        await progress.advance(chunk)

    return await copy_orders(conn, *args, "ndjson" if export_format == "json" else "csv", to_file)


async def export_analytics_data(
    ctx: dict[str, Any], *, start_date: datetime, end_date: datetime, export_format: ExportFormat = "json"
) -> dict[str, Any]:
    """One row per order created in [start_date, end_date) into `exports/orders-<job id>.<ndjson|csv|parquet>`."""
    final = ctx["settings"].exports_dir / export_name(ctx["job_id"], export_format)
    started = time.perf_counter()
    async with ctx["db"].acquire() as conn, export_snapshot(conn):
        total = await count_orders(conn, start_date, end_date)
        await report_progress(ctx, 0.0, f"exporting {total:,} orders as {EXTENSIONS[export_format]}")
        async with AtomicFile(final) as out:
            rows = await _copy_into(conn, (start_date, end_date), export_format, out, _Progress(ctx, total))
    result = ExportResult(
        path=str(final.resolve()),
        format=export_format,
        rows=rows,
        bytes=out.size,
        sha256=out.sha256,
        start_date=start_date,
        end_date=end_date,
        seconds=round(time.perf_counter() - started, 3),
    )
    return result.model_dump(mode="json")


async def prune_exports(ctx: dict[str, Any]) -> dict[str, Any]:
    """Delete exports older than SALESDASH_EXPORT_RETENTION_DAYS, and partial files no run is writing any more."""
    settings = ctx["settings"]
    now = time.time()
    files_before = now - settings.export_retention_days * 86400
    # a partial file untouched for longer than an export may run belongs to a run that died (SIGKILL, power loss)
    partial_before = now - get_task("export_analytics_data").timeout_s
    removed = await asyncio.to_thread(_prune, settings.exports_dir, files_before, partial_before)
    return {**removed, "older_than_days": settings.export_retention_days}


def _prune(directory: Path, files_before: float, partial_before: float) -> dict[str, int]:
    removed = {"deleted": 0, "partial_deleted": 0}
    if not directory.is_dir():
        return removed
    with os.scandir(directory) as entries:
        for entry in entries:
            temp = is_temp(entry.name)
            if not (temp or is_export(entry.name)) or not entry.is_file(follow_symlinks=False):
                continue  # not ours: left alone
            if entry.stat(follow_symlinks=False).st_mtime < (partial_before if temp else files_before):
                Path(entry.path).unlink(missing_ok=True)
                removed["partial_deleted" if temp else "deleted"] += 1
    return removed
