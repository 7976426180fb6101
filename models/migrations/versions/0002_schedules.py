"""schedules: one row per schedule window, and each schedule's baseline of content hashes

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "schedule_runs",
        sa.Column("id", BigId, nullable=False),
        sa.Column("schedule", sa.String(length=200), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("job_id", BigId, nullable=True),
        sa.Column("documents_seen", sa.Integer(), nullable=False),
        sa.Column("documents_new", sa.Integer(), nullable=False),
        sa.Column("documents_changed", sa.Integer(), nullable=False),
        sa.Column("documents_unchanged", sa.Integer(), nullable=False),
        sa.Column("documents_rejected", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule", "window_start"),
    )
    with op.batch_alter_table("schedule_runs") as batch_op:
        batch_op.create_index("ix_schedule_runs_job_id", ["job_id"], unique=False)

    op.create_table(
        "schedule_documents",
        sa.Column("schedule", sa.String(length=200), nullable=False),
        sa.Column("external_id", sa.String(length=1000), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("run_id", BigId, nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["schedule_runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("schedule", "external_id"),
    )


def downgrade() -> None:
    op.drop_table("schedule_documents")
    with op.batch_alter_table("schedule_runs") as batch_op:
        batch_op.drop_index("ix_schedule_runs_job_id")
    op.drop_table("schedule_runs")
