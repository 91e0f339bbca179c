"""Analytics rollups (issue 7, views domain): the four materialized views become plain tables that the refresh jobs
maintain incrementally, fed by an invalidation log that statement-level triggers write (db/queries/views.py).

- `mv_hourly_sales_metrics` (UTC hours), `mv_daily_sales_summary`, `mv_daily_product_sales`,
  `mv_daily_category_sales` (local days in SALESDASH_TIMEZONE): tables with primary keys, same names and columns
  as the views plus the new measures.
- `rollup_customer_first_orders`: each customer's first order, for new vs returning customers per day.
- `rollup_invalidations`: (family, 15-minute UTC bucket) rows written by the triggers on orders, order_items and
  products, consumed by the refreshes. No unique index: two writers touching one bucket never wait on each other.
- `rollup_state`: per family, the timezone the rollups were last rebuilt in; NULL (after this migration, or after a
  TRUNCATE of the sales tables) makes the next refresh of that family a full rebuild.

Statement triggers with transition tables see the rows of every partition when the statement names the partitioned
parent (INSERT, UPDATE including rows moving between partitions, DELETE, COPY into the parent). Writes that name a
partition directly (the demo-data loader, ATTACH PARTITION) bypass them: the loader rebuilds the rollups itself.

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_DROP_VIEWS = """DROP MATERIALIZED VIEW IF EXISTS mv_daily_category_sales, mv_daily_product_sales,
    mv_daily_sales_summary, mv_hourly_sales_metrics"""

_TABLES = [
    """CREATE TABLE mv_hourly_sales_metrics (
    hour                timestamp PRIMARY KEY,  -- UTC hour, as the view had it
    orders_count        bigint NOT NULL,
    paid_orders         bigint NOT NULL,
    revenue             numeric(16, 2) NOT NULL,
    units               bigint NOT NULL,
    avg_order_value     numeric(16, 2),  -- revenue / paid_orders; NULL without paid orders
    unique_customers    bigint NOT NULL,
    cancelled_orders    bigint NOT NULL,
    refunded_orders     bigint NOT NULL,
    refunded_amount     numeric(16, 2) NOT NULL
)""",
    """CREATE TABLE mv_daily_sales_summary (
    day                 date PRIMARY KEY,  -- local day in SALESDASH_TIMEZONE
    orders_count        bigint NOT NULL,
    paid_orders         bigint NOT NULL,
    revenue             numeric(16, 2) NOT NULL,
    units               bigint NOT NULL,
    avg_order_value     numeric(16, 2),
    unique_customers    bigint NOT NULL,
    new_customers       bigint NOT NULL,
    returning_customers bigint NOT NULL,
    cancelled_orders    bigint NOT NULL,
    refunded_orders     bigint NOT NULL,
    refunded_amount     numeric(16, 2) NOT NULL
)""",
    """CREATE TABLE mv_daily_product_sales (
    day                 date NOT NULL,
    product_id          bigint NOT NULL,
    units               bigint NOT NULL,
    revenue             numeric(16, 2) NOT NULL,
    orders_count        bigint NOT NULL,
    PRIMARY KEY (day, product_id)
)""",
    """CREATE TABLE mv_daily_category_sales (
    day                 date NOT NULL,
    category            text NOT NULL,
    units               bigint NOT NULL,
    revenue             numeric(16, 2) NOT NULL,
    orders_count        bigint NOT NULL,
    PRIMARY KEY (day, category)
)""",
    """CREATE TABLE rollup_customer_first_orders (
    customer_id         bigint PRIMARY KEY,
    first_order_at      timestamptz NOT NULL
)""",
    "CREATE INDEX rollup_customer_first_orders_at_idx ON rollup_customer_first_orders (first_order_at)",
    """CREATE TABLE rollup_invalidations (
    family              text NOT NULL CHECK (family IN ('realtime', 'daily')),
    bucket              timestamptz NOT NULL  -- date_bin('15 minutes', created_at, 'epoch')
)""",
    """CREATE TABLE rollup_state (
    family              text PRIMARY KEY CHECK (family IN ('realtime', 'daily')),
    timezone            text,  -- what the rollups were rebuilt in; NULL: the next refresh rebuilds them
    rebuilt_at          timestamptz
)""",
    "INSERT INTO rollup_state (family) VALUES ('realtime'), ('daily')",
]

# Every real UTC offset is a multiple of 15 minutes, so a 15-minute bucket lies within one local day and one hour.
_BUCKET = "date_bin('15 minutes', {column}, timestamptz 'epoch')"


def _log_changes_function(name: str, columns: str) -> str:
    """The trigger function of orders or order_items: log the 15-minute buckets of the statement's rows, for both
    families. INSERT: every new row; DELETE: every old row; UPDATE: the rows that differ in `columns`, both sides
    (an order moved to another time logs its old and its new bucket; a change of updated_at alone logs nothing).
    Transition tables are visible only in the trigger function itself, hence one branch per operation."""
    sources = {
        "INSERT": "SELECT created_at FROM new_rows",
        "DELETE": "SELECT created_at FROM old_rows",
        "UPDATE": f"""SELECT created_at
                      FROM ((SELECT {columns} FROM old_rows EXCEPT SELECT {columns} FROM new_rows)
                            UNION ALL
                            (SELECT {columns} FROM new_rows EXCEPT SELECT {columns} FROM old_rows)) changed""",
    }
    insert = f"""INSERT INTO rollup_invalidations (family, bucket)
        SELECT f.family, b.bucket
          FROM (SELECT DISTINCT {_BUCKET.format(column="created_at")} AS bucket FROM ({{source}}) changed_rows) b
         CROSS JOIN (VALUES ('realtime'), ('daily')) AS f (family);"""
    return f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {insert.format(source=sources["INSERT"])}
    ELSIF TG_OP = 'DELETE' THEN
        {insert.format(source=sources["DELETE"])}
    ELSE
        {insert.format(source=sources["UPDATE"])}
    END IF;
    RETURN NULL;
END
$fn$"""


_PRODUCTS_FUNCTION = f"""CREATE FUNCTION rollup_log_product_changes() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    -- a product that changes category (or id) or goes away moves its sales between categories: log the buckets
    -- of its items (order_items_product_idx); only the daily category rollup reads products
    IF TG_OP = 'DELETE' THEN
        INSERT INTO rollup_invalidations (family, bucket)
        SELECT DISTINCT 'daily', {_BUCKET.format(column="i.created_at")}
          FROM order_items i
         WHERE i.product_id IN (SELECT id FROM old_rows);
    ELSE
        INSERT INTO rollup_invalidations (family, bucket)
        SELECT DISTINCT 'daily', {_BUCKET.format(column="i.created_at")}
          FROM order_items i
         WHERE i.product_id IN (SELECT id FROM (SELECT id, category FROM old_rows
                                                EXCEPT SELECT id, category FROM new_rows) gone
                                UNION
                                SELECT id FROM (SELECT id, category FROM new_rows
                                                EXCEPT SELECT id, category FROM old_rows) came);
    END IF;
    RETURN NULL;
END
$fn$"""

_STALE_FUNCTION = """CREATE FUNCTION rollup_mark_stale() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    -- TRUNCATE fires neither row nor transition-table triggers: the next refresh of these families rebuilds them
    UPDATE rollup_state SET timezone = NULL WHERE family = ANY (TG_ARGV);
    RETURN NULL;
END
$fn$"""

_ORDER_COLUMNS = "id, customer_id, status, total_amount, created_at"
_ITEM_COLUMNS = "order_id, product_id, quantity, unit_price, created_at"  # line_no is not measured


def _statement_triggers(table: str, function: str, operations: tuple[str, ...]) -> list[str]:
    # one trigger per operation: a trigger with transition tables may fire on one event only
    referencing = {
        "INSERT": "NEW TABLE AS new_rows",
        "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "DELETE": "OLD TABLE AS old_rows",
    }
    return [
        f"CREATE TRIGGER rollup_log_{op.lower()} AFTER {op} ON {table} REFERENCING {referencing[op]} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        for op in operations
    ]


_TRIGGERS = [
    _log_changes_function("rollup_log_order_changes", _ORDER_COLUMNS),
    _log_changes_function("rollup_log_item_changes", _ITEM_COLUMNS),
    _PRODUCTS_FUNCTION,
    _STALE_FUNCTION,
    *_statement_triggers("orders", "rollup_log_order_changes", ("INSERT", "UPDATE", "DELETE")),
    *_statement_triggers("order_items", "rollup_log_item_changes", ("INSERT", "UPDATE", "DELETE")),
    *_statement_triggers("products", "rollup_log_product_changes", ("UPDATE", "DELETE")),
    "CREATE TRIGGER rollup_stale AFTER TRUNCATE ON orders "
    "FOR EACH STATEMENT EXECUTE FUNCTION rollup_mark_stale('realtime', 'daily')",
    "CREATE TRIGGER rollup_stale AFTER TRUNCATE ON order_items "
    "FOR EACH STATEMENT EXECUTE FUNCTION rollup_mark_stale('realtime', 'daily')",
    "CREATE TRIGGER rollup_stale AFTER TRUNCATE ON products "
    "FOR EACH STATEMENT EXECUTE FUNCTION rollup_mark_stale('daily')",
]

_DROP = [
    *(
        f"DROP TRIGGER IF EXISTS rollup_log_{op} ON {table}"
        for table in ("orders", "order_items")
        for op in ("insert", "update", "delete")
    ),
    *(f"DROP TRIGGER IF EXISTS rollup_log_{op} ON products" for op in ("update", "delete")),
    *(f"DROP TRIGGER IF EXISTS rollup_stale ON {table}" for table in ("orders", "order_items", "products")),
    "DROP FUNCTION IF EXISTS rollup_log_order_changes(), rollup_log_item_changes(), rollup_log_product_changes(), "
    "rollup_mark_stale()",
    "DROP TABLE IF EXISTS rollup_state, rollup_invalidations, rollup_customer_first_orders, mv_daily_category_sales, "
    "mv_daily_product_sales, mv_daily_sales_summary, mv_hourly_sales_metrics",
]

# The views of 0001, for the downgrade (empty until refreshed, as 0001 left them).
_VIEWS_0001 = [
    """CREATE MATERIALIZED VIEW mv_hourly_sales_metrics AS
SELECT date_trunc('hour', o.created_at AT TIME ZONE 'UTC') AS hour,
       count(*) AS orders_count,
       count(*) FILTER (WHERE o.status IN ('paid','shipped','delivered')) AS paid_orders,
       coalesce(sum(o.total_amount) FILTER (WHERE o.status IN ('paid','shipped','delivered')), 0)::numeric(16,2)
           AS revenue,
       count(DISTINCT o.customer_id) AS unique_customers,
       count(*) FILTER (WHERE o.status = 'cancelled') AS cancelled_orders
  FROM orders o
 GROUP BY 1
WITH NO DATA""",
    "CREATE UNIQUE INDEX mv_hourly_sales_metrics_uq ON mv_hourly_sales_metrics (hour)",
    """CREATE MATERIALIZED VIEW mv_daily_sales_summary AS
SELECT (o.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS orders_count,
       count(*) FILTER (WHERE o.status IN ('paid','shipped','delivered')) AS paid_orders,
       coalesce(sum(o.total_amount) FILTER (WHERE o.status IN ('paid','shipped','delivered')), 0)::numeric(16,2)
           AS revenue,
       coalesce(sum(o.total_amount) FILTER (WHERE o.status = 'refunded'), 0)::numeric(16,2) AS refunded_amount,
       count(*) FILTER (WHERE o.status = 'cancelled') AS cancelled_orders,
       count(DISTINCT o.customer_id) AS unique_customers
  FROM orders o
 GROUP BY 1
WITH NO DATA""",
    "CREATE UNIQUE INDEX mv_daily_sales_summary_uq ON mv_daily_sales_summary (day)",
    """CREATE MATERIALIZED VIEW mv_daily_product_sales AS
SELECT (i.created_at AT TIME ZONE 'UTC')::date AS day,
       i.product_id,
       sum(i.quantity)::bigint AS units,
       sum(i.quantity * i.unit_price)::numeric(16,2) AS revenue,
       count(DISTINCT i.order_id) AS orders_count
  FROM order_items i
  JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at
 WHERE o.status IN ('paid','shipped','delivered')
 GROUP BY 1, 2
WITH NO DATA""",
    "CREATE UNIQUE INDEX mv_daily_product_sales_uq ON mv_daily_product_sales (day, product_id)",
    """CREATE MATERIALIZED VIEW mv_daily_category_sales AS
SELECT (i.created_at AT TIME ZONE 'UTC')::date AS day,
       p.category,
       sum(i.quantity)::bigint AS units,
       sum(i.quantity * i.unit_price)::numeric(16,2) AS revenue,
       count(DISTINCT i.order_id) AS orders_count
  FROM order_items i
  JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at
  JOIN products p ON p.id = i.product_id
 WHERE o.status IN ('paid','shipped','delivered')
 GROUP BY 1, 2
WITH NO DATA""",
    "CREATE UNIQUE INDEX mv_daily_category_sales_uq ON mv_daily_category_sales (day, category)",
]


def upgrade() -> None:
    # the tables start empty and rollup_state says so: the first refresh of each family rebuilds it from orders
    for statement in [_DROP_VIEWS, *_TABLES, *_TRIGGERS]:
        op.execute(statement)


def downgrade() -> None:
    for statement in [*_DROP, *_VIEWS_0001]:
        op.execute(statement)
