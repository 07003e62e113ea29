"""The embedded job store on SQLite: one public class, its parts split by job."""

from taskd.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
