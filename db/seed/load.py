"""Loading the generated data: one transaction, or orders and items staged in parallel and swapped in."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import numpy as np

from db.queries.views import RefreshLimits, lock_rollups, rebuild
from db.seed.binary import _CUSTOMER_COLUMNS, _ITEM_COLUMNS, _ORDER_COLUMNS, _PRODUCT_COLUMNS, _copy
from db.seed.model import _Chunk, _Generator, _months_before, _to_us
from salesdash.config import get_settings


@dataclass(frozen=True)
class SeedSummary:
    """What `seed` loaded. ``timings`` splits ``seconds`` into phases (``generate`` runs on a worker
    thread while ``copy_orders``/``copy_items`` stream, so the phases overlap)."""

    customers: int
    products: int
    orders: int
    order_items: int
    seconds: float
    seed: int = 0
    months: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    revenue: Decimal = Decimal("0.00")  # sum of total_amount over paid, shipped and delivered orders
    low_stock_products: int = 0
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def orders_per_second(self) -> float:
        return self.orders / self.seconds if self.seconds > 0 else 0.0

    @property
    def items_per_second(self) -> float:
        return self.order_items / self.seconds if self.seconds > 0 else 0.0


REBUILD_INDEXES_FROM = 50_000
"""Order count from which `seed` rebuilds indexes after the load instead of maintaining them (measured
crossover: at 5k orders the ~250 per-partition index builds cost more than they save, at 50k less)."""
_SEEDED_TABLES = ("customers", "products", "orders", "order_items")

# Indexes of the seeded tables (partitioned parents included) with the statements that drop and
# recreate them. Left alone: indexes a foreign key depends on, replica-identity and clustered
# indexes, indexes in a non-default tablespace, and partition-level indexes of a parent index.
_INDEX_DDL = r"""
SELECT CASE WHEN c.oid IS NULL THEN format('DROP INDEX %s', i.indexrelid::regclass)
            ELSE format('ALTER TABLE %s DROP CONSTRAINT %I', i.indrelid::regclass, c.conname) END AS drop_sql,
       CASE WHEN c.oid IS NULL THEN regexp_replace(pg_get_indexdef(i.indexrelid), '^(.*? ON )ONLY ', '\1')
            ELSE format('ALTER TABLE %s ADD CONSTRAINT %I %s', i.indrelid::regclass, c.conname,
                        pg_get_constraintdef(c.oid)) END AS create_sql
  FROM pg_index i
  JOIN pg_class ic ON ic.oid = i.indexrelid
  LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')
 WHERE i.indrelid = ANY($1::regclass[])
   AND NOT i.indisreplident AND NOT i.indisclustered AND ic.reltablespace = 0
   AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid)
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
 ORDER BY c.oid IS NULL, i.indexrelid
"""


async def _drop_indexes(conn: asyncpg.Connection) -> list[str]:
    """Drop the seeded tables' indexes; return the statements that rebuild them after the load."""
    rows = await conn.fetch(_INDEX_DDL, list(_SEEDED_TABLES))
    for row in rows:
        await conn.execute(row["drop_sql"])
    return [row["create_sql"] for row in rows]


def _validate(customers: int, products: int, orders: int, months: int, seed: int, now: datetime | None) -> None:
    for name, value in (("customers", customers), ("products", products), ("orders", orders),
                        ("months", months), ("seed", seed)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if months < 1:
        raise ValueError(f"months must be >= 1, got {months}")
    if orders > 0 and customers < 1:
        raise ValueError(f"customers must be >= 1 when orders > 0, got {customers}")
    if orders > 0 and products < 1:
        raise ValueError(f"products must be >= 1 when orders > 0, got {products}")
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be a timezone-aware datetime")


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


# New sales history replaces the old one whole: the rollups' kept months of dropped partitions (db/queries/views.py)
# go with it, so the rebuild must not keep them.
_FORGET_DROPPED_MONTHS = "DELETE FROM order_partition_drops"


class _Rollups:
    """The analytics rollups (db/queries/views.py) the load replaces the data under. Their locks are taken before
    the sales tables are truncated, so a refresh never holds one the load waits for while it waits for a table the
    load holds; they are rebuilt before the commit, so readers see the new data and its rollups together. With no
    timezone they are left alone: the TRUNCATE marks them stale and their next refresh rebuilds them."""

    def __init__(self, timezone: str | None) -> None:
        self.timezone = timezone

    async def lock(self, conn: asyncpg.Connection) -> None:
        if self.timezone is not None:
            await lock_rollups(conn)

    async def rebuild(self, conn: asyncpg.Connection, timings: dict[str, float]) -> None:
        if self.timezone is None:
            return
        tick = time.perf_counter()
        limits = RefreshLimits(lock_timeout_s=None)  # the load holds the locks already
        await rebuild(conn, timezone=self.timezone, limits=limits, reason="demo data loaded")
        timings["rollups"] = timings.get("rollups", 0.0) + time.perf_counter() - tick


# --------------------------------------------------------------------------------------------------
# Parallel load through staging tables
# --------------------------------------------------------------------------------------------------

_STAGE_INFIX = "_stage_"
"""Staging tables are named ``<partition>_stage_<token>``; they only outlive a `seed` call if the
process dies between their commit and the swap (then dropping them is safe)."""

# The partitioned indexes of a parent with the definition a staging table needs for ATTACH PARTITION
# to adopt a matching index instead of building one (constraint-backed ones need the constraint too).
_PARENT_INDEXES = r"""
SELECT i.indexrelid::regclass::text AS name,
       c.oid IS NOT NULL AS is_constraint,
       CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid) ELSE pg_get_constraintdef(c.oid) END AS definition
  FROM pg_index i
  LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')
 WHERE i.indrelid = $1::regclass
 ORDER BY c.oid IS NULL, i.indexrelid
"""
# Index names of existing partitions, keyed by the partitioned index they belong to.
_PARTITION_INDEX_NAMES = r"""
SELECT c.relname AS partition, h.inhparent::regclass::text AS parent_index, ic.relname AS name
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_index i ON i.indrelid = c.oid
  JOIN pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_inherits h ON h.inhrelid = i.indexrelid
 WHERE n.oid = $1::regnamespace AND c.relname = ANY($2::text[])
"""
_CREATE_INDEX = re.compile(r"^(CREATE (?:UNIQUE )?INDEX )\S+( ON )(?:ONLY )?\S+")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _month_bounds(start: datetime, end: datetime) -> dict[str, tuple[str, str]]:
    """Partition suffix -> (from, to) bounds of every month partition of the window, as
    ``ensure_order_partitions`` creates them."""
    bounds: dict[str, tuple[str, str]] = {}
    month = date(start.year, start.month, 1)
    while month <= end.date():
        following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
        bounds[month.strftime("%Y_%m")] = (f"{month.isoformat()} 00:00:00+00", f"{following.isoformat()} 00:00:00+00")
        month = following
    return bounds


async def _connect_like(conn: asyncpg.Connection, dsn: str | None) -> asyncpg.Connection | None:
    """A second connection to ``dsn``, checked to reach ``conn``'s database, with its search_path; None when
    there is no dsn or that fails (the load then runs on ``conn`` alone)."""
    if dsn is None:
        return None
    try:
        helper: asyncpg.Connection = await asyncpg.connect(dsn)
    except Exception:
        return None
    try:
        expected = await conn.fetchrow("SELECT current_database() AS db, current_setting('search_path') AS path")
        if await helper.fetchval("SELECT current_database()") != expected["db"]:
            raise RuntimeError("the second connection reached another database")
        await helper.execute("SELECT set_config('search_path', $1, false)", expected["path"])
    except Exception:
        helper.terminate()
        return None
    return helper


class _StagedLoad:
    """Orders and order_items loaded in parallel, each on its own connection into fresh staging
    tables (one per month, with a CHECK on the month's bounds) that get the parent's indexes and are
    committed; then one transaction on the caller's connection swaps them in for the month
    partitions (ATTACH PARTITION adopts their indexes and skips the scan) and reloads customers and
    products. Until that commits nobody sees any of it, so a failure leaves the previous data."""

    def __init__(self, conn: asyncpg.Connection, helper: asyncpg.Connection, start: datetime, end: datetime,
                 timings: dict[str, float], bar: Any, rollups: _Rollups) -> None:  # fmt: skip
        self.conn, self.helper, self.start, self.end, self.timings, self.bar = conn, helper, start, end, timings, bar
        self.rollups = rollups
        self.bounds = _month_bounds(start, end)
        token = uuid.uuid4().hex[:8]
        self.stages = {
            parent: {suffix: f"{parent}_p{suffix}{_STAGE_INFIX}{token}" for suffix in self.bounds}
            for parent in ("orders", "order_items")
        }
        self.schema = self.namespace = "public"
        self.committed: list[str] = []  # staging tables that exist outside their loading transaction
        self.total_items = self.revenue_cents = self.low_stock = 0
        self.transaction: Any = None  # the swap transaction on ``conn``, open from the end of its staging on

    def _add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    async def _produce(self, generator: _Generator, queues: Sequence[asyncio.Queue[_Chunk | None]]) -> None:
        for k in range(len(generator.chunk_sizes)):
            chunk = await asyncio.to_thread(generator.chunk, k)
            self._add("generate", chunk.seconds)
            for queue in queues:
                await queue.put(chunk)
        for queue in queues:
            await queue.put(None)

    async def _stage(
        self, conn: asyncpg.Connection, parent: str, queue: asyncio.Queue[_Chunk | None], then: _Generator | None = None
    ) -> None:
        columns, is_orders = (_ORDER_COLUMNS, True) if parent == "orders" else (_ITEM_COLUMNS, False)
        stages = self.stages[parent]
        tick = time.perf_counter()
        indexes = await conn.fetch(_PARENT_INDEXES, parent)
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute("".join(
                f"CREATE TABLE {self.schema}.{stage} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS, "
                f"CONSTRAINT {stage}_bounds CHECK (created_at >= '{lo}' AND created_at < '{hi}'));\n"
                for stage, (lo, hi) in zip(stages.values(), self.bounds.values(), strict=True)
            ))  # fmt: skip
            self._add(f"prepare_{parent}", time.perf_counter() - tick)
            tick = time.perf_counter()
            while (chunk := await queue.get()) is not None:
                wait = time.perf_counter()
                self._add(f"wait_generate_{parent}", wait - tick)
                for suffix, orders_body, items_body in chunk.segments:  # created in this transaction: FREEZE
                    body = orders_body if is_orders else items_body
                    await _copy(conn, stages[suffix], columns, body, True)  # in orders' schema
                tick = time.perf_counter()
                self._add(f"copy_{parent}", tick - wait)
                if parent == "orders":
                    self.revenue_cents += chunk.revenue_cents
                    if self.bar is not None:
                        rate = f"{chunk.orders / max(tick - wait, 1e-9):,.0f}/s"
                        self.bar.update(self.orders_task, advance=chunk.orders, rate=rate)
                else:
                    self.total_items += chunk.items
            await conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
            for stage in stages.values():
                statements = []
                for k, index in enumerate(indexes):
                    name = f"{stage}_i{k}"
                    if index["is_constraint"]:
                        statements.append(
                            f"ALTER TABLE {self.schema}.{stage} ADD CONSTRAINT {name} {index['definition']}"
                        )
                    else:
                        target = f"{self.schema}.{stage}"
                        statements.append(_CREATE_INDEX.sub(rf"\g<1>{name}\g<2>{target}", index["definition"], count=1))
                await conn.execute(";\n".join(statements))
                if self.bar is not None:
                    self.bar.advance(self.index_task)
            tick = self._mark_since(f"build_indexes_{parent}", tick)
        self.committed += stages.values()
        self._mark_since(f"commit_{parent}", tick)
        if then is not None:
            await self._customers_and_products(then)

    def _mark_since(self, phase: str, since: float) -> float:
        moment = time.perf_counter()
        self._add(phase, moment - since)
        return moment

    async def load(self, generator: _Generator) -> None:
        """Stage orders (on the caller's connection) and order_items (on the helper) in parallel."""
        self.namespace = await self.conn.fetchval(
            "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'orders'::regclass"
        )  # already quoted where needed
        self.schema = self.namespace
        bar = self.bar
        self.orders_task = bar.add_task("orders", total=generator.n_orders, rate="") if bar is not None else None
        self.index_task = bar.add_task("indexes", total=2 * len(self.bounds), rate="") if bar is not None else None
        queues: list[asyncio.Queue[_Chunk | None]] = [asyncio.Queue(maxsize=1), asyncio.Queue(maxsize=1)]
        tasks = [
            asyncio.ensure_future(self._produce(generator, queues)),
            asyncio.ensure_future(self._stage(self.conn, "orders", queues[0], generator)),
            asyncio.ensure_future(self._stage(self.helper, "order_items", queues[1])),
        ]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [task for task in done if task.exception() is not None]
        if failed:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failed[0].exception()  # type: ignore[misc]

    async def _customers_and_products(self, generator: _Generator) -> None:
        """Open the swap transaction on the caller's connection (once its orders are staged) and
        reload customers and products in it while order_items are still being staged."""
        conn = self.conn
        tick = time.perf_counter()
        self.transaction = conn.transaction()
        await self.transaction.start()
        await self.rollups.lock(conn)
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute("TRUNCATE customers, products RESTART IDENTITY")
        body = await asyncio.to_thread(generator.customers_body)
        tick = self._mark_since("generate", tick)
        await _copy(conn, "customers", _CUSTOMER_COLUMNS, body, True)
        del body
        tick = self._mark_since("copy_customers", tick)
        body, self.low_stock = await asyncio.to_thread(generator.products_body)
        tick = self._mark_since("generate", tick)
        await _copy(conn, "products", _PRODUCT_COLUMNS, body, True)
        del body
        self._mark_since("copy_products", tick)

    async def swap(self, start: datetime, end: datetime, counts: dict[str, int]) -> None:
        """Finish the transaction that makes the new data visible: the staged months replace the
        month partitions, the sequences continue after the loaded ids."""
        conn, schema, transaction = self.conn, self.schema, self.transaction
        assert transaction is not None
        tick = time.perf_counter()
        await conn.execute("SELECT ensure_order_partitions($1::date, $2::date)", start.date(), end.date())
        partitions = [f"{parent}_p{suffix}" for parent in self.stages for suffix in self.bounds]
        old_names = {
            (row["partition"], row["parent_index"]): row["name"]
            for row in await conn.fetch(_PARTITION_INDEX_NAMES, self.namespace, partitions)
        }
        indexes = {parent: await conn.fetch(_PARENT_INDEXES, parent) for parent in self.stages}
        # Dropping a partition leaves the parents, their indexes and the views on them alone; the
        # staged tables carry the partition bounds as a CHECK and the parent indexes' twins, so
        # ATTACH neither scans them nor builds anything.
        script = [f"DROP TABLE {', '.join(f'{schema}.{p}' for p in partitions)}",
                  "TRUNCATE order_items, orders RESTART IDENTITY", _FORGET_DROPPED_MONTHS]  # fmt: skip
        for parent, stages in self.stages.items():
            for suffix, stage in stages.items():
                partition = f"{parent}_p{suffix}"
                lo, hi = self.bounds[suffix]
                script += [
                    f"ALTER TABLE {schema}.{stage} RENAME TO {partition}",
                    f"ALTER TABLE {parent} ATTACH PARTITION {schema}.{partition} FOR VALUES FROM ('{lo}') TO ('{hi}')",
                    f"ALTER TABLE {schema}.{partition} DROP CONSTRAINT {stage}_bounds",
                ]  # fmt: skip
                for k, index in enumerate(indexes[parent]):
                    name = old_names.get((partition, index["name"]))
                    if name is not None:  # keep the partition's index names
                        script.append(f"ALTER INDEX {schema}.{stage}_i{k} RENAME TO {_quote(name)}")
        await conn.execute(";\n".join(script))
        for table, count in counts.items():
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence($1, 'id'), $2, $3)", table, max(count, 1), count > 0
            )
        tick = self._mark_since("swap", tick)
        await self.rollups.rebuild(conn, self.timings)
        tick = time.perf_counter()
        self.transaction = None
        await transaction.commit()
        self.committed = []  # attached and renamed: no longer staging tables
        self._mark_since("commit", tick)

    async def discard(self) -> None:
        """Best effort after a failure: roll the swap transaction back, drop committed staging tables."""
        if self.transaction is not None:
            with contextlib.suppress(Exception):
                await self.transaction.rollback()
            self.transaction = None
        if not self.committed:
            return
        statement = f"DROP TABLE IF EXISTS {', '.join(f'{self.schema}.{t}' for t in self.committed)}"
        for connection in (self.conn, self.helper):
            with contextlib.suppress(Exception):
                if not connection.is_closed() and not connection.is_in_transaction():
                    await connection.execute(statement)
                    self.committed = []
                    return


# --------------------------------------------------------------------------------------------------
# Serial load in one transaction
# --------------------------------------------------------------------------------------------------


class _SerialLoad:
    """Everything in one transaction on the caller's connection (a savepoint if it is already in
    one): TRUNCATE, month partitions, indexes dropped if asked, customers, orders and order_items
    chunk by chunk (the next chunk generated while this one streams), products, indexes rebuilt,
    sequences set past the loaded ids."""

    def __init__(self, conn: asyncpg.Connection, generator: _Generator, timings: dict[str, float], bar: Any,
                 started: float, tick: float, rollups: _Rollups) -> None:  # fmt: skip
        self.conn, self.generator, self.timings, self.bar, self.rollups = conn, generator, timings, bar, rollups
        self.started, self.tick = started, tick  # the start of `seed`, the end of the last phase
        # COPY FREEZE needs the table truncated in the current (sub)transaction and no other open
        # snapshot or portal: only take it when we own the transaction.
        self.freeze = not conn.is_in_transaction()
        self.total_items = self.revenue_cents = self.low_stock = 0

    def _mark(self, phase: str) -> None:
        moment = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + moment - self.tick
        self.tick = moment

    async def run(self, start: datetime, end: datetime, counts: dict[str, int], rebuild_indexes: bool) -> None:
        conn = self.conn
        async with conn.transaction():
            await self.rollups.lock(conn)
            rebuild = await self._prepare(start, end, rebuild_indexes)
            await self._customers()
            await self._orders(counts["orders"])
            await self._products()
            await self._build_indexes(rebuild)
            for table, count in counts.items():
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence($1, 'id'), $2, $3)", table, max(count, 1), count > 0
                )
            await self.rollups.rebuild(conn, self.timings)
            self.tick = time.perf_counter()
        self._mark("commit")

    async def _prepare(self, start: datetime, end: datetime, rebuild_indexes: bool) -> list[str]:
        """Empty the tables and make the month partitions; return the statements rebuilding the
        dropped indexes (none unless ``rebuild_indexes``)."""
        conn = self.conn
        if self.freeze:  # our own transaction: nothing to lose but the last ms of WAL on a crash
            await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute("TRUNCATE order_items, orders, customers, products RESTART IDENTITY")
        await conn.execute(_FORGET_DROPPED_MONTHS)
        await conn.execute("SELECT ensure_order_partitions($1::date, $2::date)", start.date(), end.date())
        rebuild = await _drop_indexes(conn) if rebuild_indexes else []
        self._mark("prepare")
        return rebuild

    async def _customers(self) -> None:
        body = await asyncio.to_thread(self.generator.customers_body)
        self._mark("generate")
        await _copy(self.conn, "customers", _CUSTOMER_COLUMNS, body)
        del body
        self._mark("copy_customers")

    def _generate(self, k: int) -> asyncio.Future[_Chunk]:
        return asyncio.ensure_future(asyncio.to_thread(self.generator.chunk, k))

    async def _orders(self, orders: int) -> None:
        bar = self.bar
        task = bar.add_task("orders", total=orders, rate="") if bar is not None else None
        n_chunks = len(self.generator.chunk_sizes)
        next_chunk: asyncio.Future[_Chunk] | None = None
        try:
            if n_chunks:
                next_chunk = self._generate(0)
            done = 0
            for k in range(n_chunks):
                assert next_chunk is not None
                chunk = await next_chunk
                self._mark("wait_generate")
                self.timings["generate"] = self.timings.get("generate", 0.0) + chunk.seconds
                next_chunk = None
                if k + 1 < n_chunks:  # generate the next chunk while this one streams
                    next_chunk = self._generate(k + 1)
                await self._copy_chunk(chunk)
                done += chunk.orders
                if bar is not None:
                    rate = f"{done / (time.perf_counter() - self.started):,.0f}/s"
                    bar.update(task, advance=chunk.orders, rate=rate)
        finally:
            if next_chunk is not None:  # a COPY failed: let the worker thread finish first
                with contextlib.suppress(Exception):
                    await next_chunk

    async def _copy_chunk(self, chunk: _Chunk) -> None:
        for suffix, orders_body, items_body in chunk.segments:
            await _copy(self.conn, f"orders_p{suffix}", _ORDER_COLUMNS, orders_body, self.freeze)
            self._mark("copy_orders")
            await _copy(self.conn, f"order_items_p{suffix}", _ITEM_COLUMNS, items_body, self.freeze)
            self._mark("copy_items")
        self.total_items += chunk.items
        self.revenue_cents += chunk.revenue_cents

    async def _products(self) -> None:
        body, self.low_stock = await asyncio.to_thread(self.generator.products_body)
        self._mark("generate")
        await _copy(self.conn, "products", _PRODUCT_COLUMNS, body)
        del body
        self._mark("copy_products")

    async def _build_indexes(self, rebuild: list[str]) -> None:
        conn, bar = self.conn, self.bar
        task = bar.add_task("indexes", total=len(rebuild), rate="") if bar is not None and rebuild else None
        if rebuild:  # sorts for the index builds stay in memory instead of spilling to disk
            await conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        for statement in rebuild:
            await conn.execute(statement)
            if bar is not None:
                bar.advance(task)
        self._mark("build_indexes")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


async def _load_staged(
    conn: asyncpg.Connection, helper: asyncpg.Connection, generator: _Generator, start: datetime, end: datetime,
    counts: dict[str, int], timings: dict[str, float], progress: bool, rollups: _Rollups,
) -> _StagedLoad:  # fmt: skip
    """Run `_StagedLoad` with ``helper`` as the second connection, which is closed afterwards."""
    try:
        with _progress_bar(progress) as bar:
            staged = _StagedLoad(conn, helper, start, end, timings, bar, rollups)
            try:
                await staged.load(generator)
                await staged.swap(start, end, counts)
            except BaseException:
                helper.terminate()  # may be mid-COPY; its staging transaction rolls back
                await staged.discard()
                raise
    finally:
        if not helper.is_closed():
            await helper.close()
    return staged


async def _load_serial(
    conn: asyncpg.Connection, generator: _Generator, start: datetime, end: datetime, counts: dict[str, int],
    rebuild_indexes: bool, timings: dict[str, float], progress: bool, started: float, tick: float, rollups: _Rollups,
) -> _SerialLoad:  # fmt: skip
    with _progress_bar(progress) as bar:
        serial = _SerialLoad(conn, generator, timings, bar, started, tick, rollups)
        await serial.run(start, end, counts, rebuild_indexes)
    return serial


def _summary(
    loaded: _StagedLoad | _SerialLoad, counts: dict[str, int], *, seed: int, months: int, start: datetime,
    end: datetime, started: float,
) -> SeedSummary:  # fmt: skip
    return SeedSummary(
        customers=counts["customers"],
        products=counts["products"],
        orders=counts["orders"],
        order_items=loaded.total_items,
        seconds=time.perf_counter() - started,
        seed=seed,
        months=months,
        window_start=start,
        window_end=end,
        revenue=Decimal(loaded.revenue_cents).scaleb(-2),
        low_stock_products=loaded.low_stock,
        timings=loaded.timings,
    )


async def seed(
    conn: asyncpg.Connection,
    *,
    customers: int,
    products: int,
    orders: int,
    months: int,
    seed: int,
    progress: bool = True,
    now: datetime | None = None,
    rebuild_indexes: bool | None = None,
    parallel: bool | None = None,
    dsn: str | None = None,
    rollups: bool = True,
) -> SeedSummary:
    """Replace customers, products, orders and order_items with generated demo data.

    Orders span ``now - months`` .. ``now`` (``now`` defaults to the current time; pass it for
    reproducible data). Everything runs in one transaction (a savepoint if ``conn`` is already in
    one): TRUNCATE ... RESTART IDENTITY, month partitions via ``ensure_order_partitions``, binary
    COPY of all rows straight into the month partitions, identity/sequence values set past the
    loaded ids. Raises ValueError naming the bad argument before touching the database.

    ``rebuild_indexes`` drops the four tables' indexes (primary keys and unique constraints
    included) after the TRUNCATE and recreates them from their catalog definitions after the load,
    in the same transaction: sorted builds cost half of what row-by-row maintenance does. ``None``
    (default) does so from ``REBUILD_INDEXES_FROM`` orders on.

    ``parallel`` loads orders and order_items at the same time on two connections (the second one
    opened to ``dsn``, the same database as ``conn``) into staging tables that one final transaction swaps
    in for the month partitions (see `_StagedLoad`); still all or nothing. ``None`` (default) does
    so when indexes are rebuilt and ``conn`` is not inside a transaction. Without a second
    connection, or inside the caller's transaction, everything runs on ``conn``.

    ``rollups`` rebuilds the analytics rollups from the new data in the same transaction (in
    ``SALESDASH_TIMEZONE``; timing ``rollups``): the loader writes the month partitions directly, which
    the rollups' change capture does not see. ``False`` leaves them stale until their next refresh,
    which then rebuilds them.
    """
    _validate(customers, products, orders, months, seed, now)
    started = time.perf_counter()
    end = (now if now is not None else datetime.now(UTC)).astimezone(UTC)
    start = _months_before(end, months)
    if rebuild_indexes is None:
        rebuild_indexes = orders >= REBUILD_INDEXES_FROM
    timings: dict[str, float] = {}
    generator = await asyncio.to_thread(
        _Generator, customers=customers, products=products, orders=orders, seed=seed,
        start_us=_to_us(start), now_us=_to_us(end),
    )  # fmt: skip
    tick = time.perf_counter()
    timings["model"] = tick - started
    if parallel is None:
        parallel = rebuild_indexes
    helper = await _connect_like(conn, dsn) if parallel and not conn.is_in_transaction() else None
    counts = {"customers": customers, "products": products, "orders": orders}
    rollup_timezone = get_settings().timezone if rollups else None
    loaded: _StagedLoad | _SerialLoad
    if helper is not None:
        loaded = await _load_staged(
            conn, helper, generator, start, end, counts, timings, progress, _Rollups(rollup_timezone)
        )
    else:
        loaded = await _load_serial(
            conn, generator, start, end, counts, rebuild_indexes, timings, progress, started, tick,
            _Rollups(rollup_timezone),
        )  # fmt: skip
    return _summary(loaded, counts, seed=seed, months=months, start=start, end=end, started=started)
