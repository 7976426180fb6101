"""reduce levels: a chunk row per reduce step, unique per (document, level, seq); the
job's reduce group size

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("reduce_tokens", sa.Integer(), nullable=True))
    with op.batch_alter_table("batches") as batch_op:
        batch_op.alter_column("seq", type_=sa.BigInteger(), existing_nullable=False)
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("level", sa.Integer(), server_default="0", nullable=False))
        batch_op.alter_column("batch_seq", type_=sa.BigInteger(), existing_nullable=False)
        batch_op.drop_index("ix_chunks_document_seq")
        batch_op.create_index("ix_chunks_document_level_seq", ["document_id", "level", "seq"],
                              unique=True)


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.drop_index("ix_chunks_document_level_seq")
        batch_op.create_index("ix_chunks_document_seq", ["document_id", "seq"], unique=False)
        batch_op.alter_column("batch_seq", type_=sa.Integer(), existing_nullable=False)
        batch_op.drop_column("level")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.alter_column("seq", type_=sa.Integer(), existing_nullable=False)
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("reduce_tokens")
