"""Demo-data generator behind ``salesdash seed``: customers, products, orders and order items.

The data is synthetic but shaped like a real shop, so that every job has something to find:

* **Time.** Orders follow a yearly season (November and December peak, Black Friday and Cyber
  Monday spikes, a Christmas-day dip), a weekday pattern (Saturday is the quietest day) and an
  hour-of-day curve (evenings busiest, 3-5 am quietest; buckets are UTC). Day-to-day noise on top.
* **Customers.** Each customer has a class (one-time, occasional or loyal buyer, the loyal ones'
  purchase rates heavy-tailed), a signup time (before the window for the steady-state share of
  each class, otherwise during it, growing 25% a year) and an active span until churn. Orders are drawn
  among the customers active at the order's instant, weighted by their rate, so frequency and
  recency vary the way RFM segmentation needs, and a customer's ``created_at`` always precedes
  their first order. Some customers never order (prospects).
* **Products.** 12 categories with their own price level, margin, lead time and basket quantity;
  popularity is Zipf-like. ``reorder_point`` comes from the generated demand of the last 28 days
  (``d̄·L + 1.65·σ·√L``), and about 3% of the products hold stock at or under it.
* **Orders.** 1-5 lines each (distinct products), historic unit prices (yearly drift, promotions,
  deeper ones around Black Friday), ``total_amount`` = the exact sum of ``quantity * unit_price``
  (everything is integer cents until PostgreSQL reads it as ``numeric``), and a status mix by age:
  recent orders are pending, paid or shipped, older ones delivered; about 5% cancelled and 3%
  refunded. ``updated_at`` follows the status.

Same ``seed`` and same ``now`` give byte-identical tables.

Speed: everything is generated with numpy in chunks of whole hours (about ``CHUNK_ORDERS`` orders)
and written straight into PostgreSQL's binary COPY format (fixed-layout numpy records, variable
text squeezed out with a byte mask), on a worker thread that prepares chunk *k+1* while the
connection streams chunk *k* into the month partitions (``COPY ... FREEZE`` when we own the
transaction, so later reads set no hint bits). PostgreSQL is the bottleneck: maintaining the five
B-tree indexes of orders/order_items row by row costs about as much again as the COPY itself, so
for large loads the indexes are dropped after the TRUNCATE and rebuilt (sorted builds) from their
catalog definitions before commit. All of it happens in one transaction that starts with
``TRUNCATE ... RESTART IDENTITY``, so a failure leaves the previous data, and indexes, intact. The
analytics rollups are rebuilt from the new data before that transaction commits (``rollups=False``
leaves that to their next refresh): the load writes partitions directly, past their change capture.
"""

from db.seed.load import REBUILD_INDEXES_FROM, SeedSummary, seed
from db.seed.model import CATEGORIES, CHUNK_ORDERS, STATUSES

__all__ = ["CATEGORIES", "CHUNK_ORDERS", "REBUILD_INDEXES_FROM", "STATUSES", "SeedSummary", "seed"]
