"""Alembic environment: migrations run over a connection that Control hands in.

Control calls :func:`control.db.engine.migrate` at start-up; it opens an async
connection and passes its sync facade in ``config.attributes["connection"]``. Running
``alembic`` from the command line is also supported (``-x url=...``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from control.db.schema import metadata

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # command-line use with a synchronous URL
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(str(url))
    with engine.begin() as conn:
        _run(conn)
