"""Message storage: the store protocol (base.py) and its backends, chosen by URL."""

from __future__ import annotations

from chat.storage.base import HISTORY_MAX_LIMIT, HistoryPage, MessageStore, Retention, StoredMessage, StoreError

__all__ = [
    "HISTORY_MAX_LIMIT",
    "HistoryPage",
    "MessageStore",
    "Retention",
    "StoreError",
    "StoredMessage",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"


def open_store(database_url: str) -> MessageStore:
    """The store for `database_url`, not yet started: `await store.start()` next.

    `sqlite:///PATH` (relative PATH; `sqlite:////abs/path` for an absolute one)
    gives a SqliteStore. Raises NotImplementedError for `postgresql://` (not
    written yet) and ValueError for anything else.
    """
    if database_url.startswith(_SQLITE_PREFIX):
        from chat.storage.sqlite import SqliteStore

        path = database_url[len(_SQLITE_PREFIX):]
        if not path:
            raise ValueError("database_url sqlite:/// has no path; use sqlite:///PATH")
        return SqliteStore(path)
    if database_url.startswith(("postgresql://", "postgres://")):
        raise NotImplementedError(
            "the Postgres store is not written yet; use database_url=sqlite:///PATH for now"
        )
    raise ValueError(f"database_url {database_url!r} is not supported; use sqlite:///PATH")
