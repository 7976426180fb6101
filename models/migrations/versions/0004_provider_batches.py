"""provider batches: the batch lane's ledger of files and batches sent to a provider's Batch API,
and the online lane's service tier

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("lane", sa.String(length=8), nullable=False, server_default="online")
        )
        batch_op.add_column(sa.Column("fallback_below", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("service_tier", sa.String(length=16), nullable=True))
    op.create_table(
        "provider_batches",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("provider_status", sa.String(length=16), nullable=True),
        sa.Column("input_file_id", sa.String(length=200), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=200), nullable=True),
        sa.Column("output_file_id", sa.String(length=200), nullable=True),
        sa.Column("error_file_id", sa.String(length=200), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("provider_batches") as batch_op:
        batch_op.create_index("ix_provider_batches_job_id", ["job_id"], unique=False)
    op.create_table(
        "provider_batch_chunks",
        sa.Column("provider_batch_id", BigId, nullable=False),
        sa.Column("chunk_id", BigId, nullable=False),
        sa.Column("live", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["provider_batch_id"], ["provider_batches.id"],
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("provider_batch_id", "chunk_id"),
    )
    with op.batch_alter_table("provider_batch_chunks") as batch_op:
        batch_op.create_index(
            "ux_provider_batch_chunks_live", ["chunk_id"], unique=True,
            postgresql_where=sa.text("live"), sqlite_where=sa.text("live"),
        )


def downgrade() -> None:
    op.drop_table("provider_batch_chunks")
    with op.batch_alter_table("provider_batches") as batch_op:
        batch_op.drop_index("ix_provider_batches_job_id")
    op.drop_table("provider_batches")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("service_tier")
        batch_op.drop_column("fallback_below")
        batch_op.drop_column("lane")
