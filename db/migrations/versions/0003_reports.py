"""Reports (issue 7, reports domain): each stored report also keeps its rendered HTML page.

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before this revision have no page. The report jobs always write one.
    op.execute("ALTER TABLE reports ADD COLUMN IF NOT EXISTS html text")
    op.execute("ALTER TABLE reports ADD CONSTRAINT reports_period_order CHECK (period_start <= period_end)")


def downgrade() -> None:
    op.execute("ALTER TABLE reports DROP CONSTRAINT IF EXISTS reports_period_order")
    op.execute("ALTER TABLE reports DROP COLUMN IF EXISTS html")
