"""streaming submission: whether a job's producer is still recording it, when it ended, and
the inputs it read (to resume a producer that died)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        # Existing jobs were recorded whole before their first batch went out.
        batch_op.add_column(sa.Column("ingesting", sa.Boolean(), server_default=sa.false(),
                                      nullable=False))
        batch_op.add_column(sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("inputs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("inputs")
        batch_op.drop_column("ingested_at")
        batch_op.drop_column("ingesting")
