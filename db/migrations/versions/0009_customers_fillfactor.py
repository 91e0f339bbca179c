"""Customers at fillfactor 35 (was 50, migration 0005): room for every row's next version on its own page.

update_customer_segments' first run and update_customer_lifetime_values' first run rewrite every customer, and each
run writes a row that grows (NULL segment and scores become values). At fillfactor 50 about one update in five found
its page full (measured at 1,000,000 customers): that update is not HOT, so it inserts into the primary key and the
email index (a uniqueness check at a random place in an index larger than shared_buffers). At 35 all of them were
HOT. The table is larger (about 290 MB instead of 200 MB at 1,000,000 customers). Pages written from now on use it;
existing rows move only when rewritten (VACUUM FULL, pg_repack).

Revision ID: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0009"
# "0006" in the slice's brief; chained after 0008 (token expiry, merged from i10-auth) so this branch has one head.
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE customers SET (fillfactor = 35)")


def downgrade() -> None:
    op.execute("ALTER TABLE customers SET (fillfactor = 50)")
