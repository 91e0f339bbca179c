"""Analytics rollups: incremental view maintenance (issue 7, views domain).
Placeholder in the revision chain until that domain lands.

Revision ID: 0002
"""

from __future__ import annotations

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
