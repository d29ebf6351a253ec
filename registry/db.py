"""Database engine, sessions and schema migrations.

SQLite (the default, a file under the data dir) runs in WAL mode with a busy timeout; writes that
assign version numbers are also serialised in-process so SQLite never answers "database is
locked" to concurrent pushes. PostgreSQL relies on row locks (``UPDATE repo … next_version``).
Sessions are synchronous; async routes call :meth:`Database.run`, which runs the work in a thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from anyio import to_thread
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

__all__ = ["Database", "make_engine", "migrate"]

T = TypeVar("T")

_MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """The engine plus the helpers routes use to open sessions."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()

    def migrate(self) -> None:
        migrate(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session for a transaction that assigns version numbers or moves pointers."""
        lock = self._write_lock if self.is_sqlite else contextlib.nullcontext()
        with lock, self.session() as session:
            yield session

    @contextlib.contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for lookups and listings.

        Every listing walks an index in key order and stops at its page size. PostgreSQL only
        plans that walk when its statistics say the table is large; on fresh or never-analysed
        tables it may sort every row of a repo instead. Ruling out sorts for these reads keeps
        their cost independent of the catalogue's size whatever the statistics say.
        """
        with self.session() as session:
            if not self.is_sqlite:
                session.exec(text("SET LOCAL enable_sort = off"))
            yield session

    async def run(self, fn: Callable[[Session], T], *, write: bool = False) -> T:
        """Run ``fn(session)`` in a worker thread and return its result."""
        def work() -> T:
            with (self.write_session() if write else self.read_session()) as session:
                return fn(session)

        return await to_thread.run_sync(work)

    def dispose(self) -> None:
        self.engine.dispose()
