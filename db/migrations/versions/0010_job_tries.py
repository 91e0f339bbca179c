"""Every try of a job (issue 11): `job_tries`, one row per try that ended (complete, failed, retried, aborted,
lost with a dead worker, fenced, or put back waiting for a dependency), written in the history flush beside
`job_runs` and deleted with its run.

Revision ID: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # no foreign key to job_runs: a lost try is recorded by the sweep before its job has a run row
    op.execute(
        """
CREATE TABLE job_tries (
    job_id       text NOT NULL,
    try_no       integer NOT NULL,
    outcome      text NOT NULL
                 CHECK (outcome IN ('complete','failed','retried','aborted','lost','fenced','waiting')),
    worker_id    text,
    host         text,
    started_at   timestamptz,
    finished_at  timestamptz NOT NULL,
    duration_ms  numeric(14, 3),
    error        text,
    -- a flush retried after a crash rewrites the same entries: the key makes that a no-op
    PRIMARY KEY (job_id, try_no, finished_at, outcome)
)"""
    )
    op.execute("CREATE INDEX job_tries_finished_idx ON job_tries (finished_at)")


def downgrade() -> None:
    op.execute("DROP TABLE job_tries")
