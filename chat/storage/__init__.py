"""Message storage: the store protocol (base.py) and its backends, chosen by URL."""

from __future__ import annotations

from chat.storage.base import (
    HISTORY_MAX_LIMIT,
    HistoryPage,
    MessageStore,
    Retention,
    StoredMessage,
    StoreError,
    StoreStatistics,
)

__all__ = [
    "HISTORY_MAX_LIMIT",
    "HistoryPage",
    "MessageStore",
    "Retention",
    "StoreError",
    "StoreStatistics",
    "StoredMessage",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_store(database_url: str, *, retention: Retention = Retention()) -> MessageStore:
    """The store for `database_url`, not yet started: `await store.start()` next.

    `sqlite:///PATH` (relative PATH; `sqlite:////abs/path` for an absolute one)
    gives a SqliteStore; `postgresql://user:password@host:port/db` (or
    `postgres://`) a PostgresStore. `retention` is what the store keeps per
    room. Raises ValueError for any other URL.
    """
    if database_url.startswith(_SQLITE_PREFIX):
        from chat.storage.sqlite import SqliteStore

        path = database_url[len(_SQLITE_PREFIX):]
        if not path:
            raise ValueError("database_url sqlite:/// has no path; use sqlite:///PATH")
        return SqliteStore(path, retention=retention)
    if database_url.startswith(_POSTGRES_PREFIXES):
        # Imported here so a SQLite install never needs asyncpg loaded.
        from chat.storage.postgres import PostgresStore

        return PostgresStore(database_url, retention=retention)
    raise ValueError(
        f"database_url {database_url!r} is not supported; use sqlite:///PATH or postgresql://user@host:port/db"
    )
