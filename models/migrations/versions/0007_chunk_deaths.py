"""the poison guard per chunk: the deliveries that died with a chunk in flight, those that
held it alone, and whether its lease is such a one; the batch's delivery count goes

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("deaths", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("deaths_alone", sa.Integer(), server_default="0",
                                      nullable=False))
        batch_op.add_column(sa.Column("leased_alone", sa.Boolean(), server_default=sa.false(),
                                      nullable=False))
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("deliveries")


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("deliveries", sa.Integer(), server_default="0",
                                      nullable=False))
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.drop_column("leased_alone")
        batch_op.drop_column("deaths_alone")
        batch_op.drop_column("deaths")
