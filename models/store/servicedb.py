"""The service's own database, beside the study storage (:func:`models.store.claims.claims_url`): its
engines, one per URL per process, and its tables.

Two stores keep their tables there: the claims (:mod:`models.store.claims`) and the usage
(:mod:`models.store.usage`). Both open it here, so a process holds one connection pool per database
whatever reads it, and a forked child (Celery's prefork pool) never shares its parent's connections:
every engine is disposed in the child, which then opens its own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["create_tables", "engine"]

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def engine(url: str) -> sa.Engine:
    """This process's engine of ``url``: for sqlite its folder made and writers waiting for its lock (30 s), else connections checked before use."""
    with _lock:
        found = _engines.get(url)
        if found is None:
            if url.startswith("sqlite:"):
                database = sa.engine.make_url(url).database
                if database and database != ":memory:":
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                found = sa.create_engine(url, connect_args={"timeout": 30})
            else:
                found = sa.create_engine(url, pool_pre_ping=True)
            _engines[url] = found
        return found


def create_tables(db: sa.Engine, metadata: sa.MetaData) -> None:
    """Create ``metadata``'s tables that ``db`` lacks; another process creating them at the same moment is fine."""
    try:
        metadata.create_all(db, checkfirst=True)
    except SQLAlchemyError:
        # Another process created them between the check and the CREATE: fine if they are there now.
        if not set(metadata.tables) <= set(sa.inspect(db).get_table_names()):
            raise


def _after_fork() -> None:
    for found in list(_engines.values()):
        found.dispose(close=False)  # the parent's connections stay the parent's; the child opens its own


os.register_at_fork(after_in_child=_after_fork)
