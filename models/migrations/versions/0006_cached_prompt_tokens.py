"""cached prompt tokens: of each result's prompt tokens, those the provider read from its
prompt cache (billed at the cached rate); their sums per document and per job

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch_op:
        batch_op.add_column(sa.Column("tokens_in_cached", sa.Integer(), server_default="0",
                                      nullable=False))
    for table in ("documents", "jobs"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("tokens_in_cached", sa.BigInteger(), server_default="0",
                                          nullable=False))


def downgrade() -> None:
    for table in ("jobs", "documents", "results"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("tokens_in_cached")
