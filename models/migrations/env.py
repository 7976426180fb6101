"""Alembic environment: the URL comes from the caller (`docq db upgrade`), never from a file."""

from alembic import context

from docqueue.models.db import make_engine
from docqueue.models.tables import Base

url: str = (context.config.attributes.get("url")
            or context.config.get_main_option("sqlalchemy.url", ""))
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
