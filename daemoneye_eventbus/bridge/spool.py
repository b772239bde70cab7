"""The bridge's spool: a bounded FIFO of outbound events on disk (SQLite).

While the link to NATS is down, the bridge puts every event it would forward
into the spool; when the link is back it drains the spool in order:
:meth:`Spool.peek` the oldest events, publish them, then :meth:`Spool.ack`
up to the last one JetStream acknowledged. An event is removed only by
``ack``, so a bridge that stops half-way re-sends the un-acknowledged ones
after its restart, and their ``Nats-Msg-Id`` lets JetStream drop the copies.

Bounds
======

The spool holds at most ``max_events`` events and ``max_bytes`` bytes (an
event's size is its subject, its headers as stored and its payload). When a
:meth:`Spool.put` would exceed either, the *oldest* events are dropped to
make room and counted in :attr:`Spool.dropped`; the new event is always
kept. An event larger than ``max_bytes`` on its own is refused
(:class:`ValueError`), not stored.

Storage
=======

One SQLite file (the standard library's :mod:`sqlite3`) in WAL mode, with
one table of events ``(seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT,
headers TEXT (JSON object of str), payload BLOB, bytes INTEGER)`` and one of
counters (the dropped count and the schema version). Every ``put`` and
``ack`` is one transaction, so the spool survives a crash of the process
with all it had committed: a reopened spool has the same events in the same
order and the same counters. ``seq`` never goes back, even across restarts.
With ``synchronous="NORMAL"`` (the default) a power failure may lose the
last transactions; ``synchronous="FULL"`` syncs the disk on every commit.

The spool holds the file's lock for as long as it is open
(``locking_mode=EXCLUSIVE``): a second spool on the same file -- another
bridge -- gets :class:`SpoolLocked` rather than a share of its events. A
file that is not a spool gives :class:`SpoolCorrupt`.

Concurrency
===========

The API is synchronous and blocking; no event loop is involved. Each call
is one small transaction (no disk sync with the default ``synchronous``), so
the asyncio layer may call it directly, or through
:func:`asyncio.to_thread`: calls from any thread are serialised by a lock.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

from daemoneye_eventbus.errors import EventBusError

__all__ = ["SCHEMA_VERSION", "SpoolCorrupt", "SpoolError", "SpoolLocked", "Spool", "SpooledEvent"]

SCHEMA_VERSION: Final = 1
"""The version of the spool's tables; a file of another version is refused."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload BLOB NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""


class SpoolError(EventBusError, OSError):
    """The spool's file cannot be used; the message says why."""


class SpoolLocked(SpoolError):
    """Another spool (another bridge, or this one twice) has the file open."""


class SpoolCorrupt(SpoolError):
    """The file is not a spool: not SQLite, damaged, or of another schema version."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One event in the spool, in the order it was put (``seq`` increases)."""

    seq: int
    subject: str
    headers: Mapping[str, str]
    payload: bytes


def _wrap(exc: sqlite3.Error, path: Path) -> SpoolError:
    """The typed error for what SQLite said about the spool at ``path``."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return SpoolLocked(f"spool {path} is in use by another spool: {text}")
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
        return SpoolError(f"spool {path} cannot be opened: {text}")
    if isinstance(exc, sqlite3.ProgrammingError):
        return SpoolError(f"spool {path}: {text}")
    if isinstance(exc, sqlite3.DatabaseError):
        return SpoolCorrupt(f"spool {path} is not a usable spool: {text}")
    return SpoolError(f"spool {path}: {text}")


class Spool:
    """A bounded FIFO of ``(subject, headers, payload)`` in one SQLite file.

    ``max_events`` and ``max_bytes`` bound it (both at least 1);
    ``lock_timeout`` is how long to wait for a file another spool holds
    before :class:`SpoolLocked`. Use it as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_events: int,
        max_bytes: int,
        lock_timeout: float = 0.1,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be at least 1")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            # A new spool is the bridge's alone (SQLite gives its -wal and -shm
            # files the database file's permissions). Only a new file: closing a
            # descriptor of a file releases this process's POSIX locks on it,
            # those of a spool already open on it too.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise SpoolError(f"spool {self.path} cannot be opened: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(
                self.path, timeout=lock_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc
        try:
            self._open(synchronous)
        except sqlite3.Error as exc:
            self._db.close()
            raise _wrap(exc, self.path) from exc
        except SpoolError:
            self._db.close()
            raise

    def _open(self, synchronous: str) -> None:
        db = self._db
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise SpoolCorrupt(f"spool {self.path}: cannot use WAL mode")  # pragma: no cover
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version == 0 and not tables:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise SpoolCorrupt(
                    f"spool {self.path} has schema version {version},"
                    f" this code reads version {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            self._depth, self._bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events"
            ).fetchone()
            (self._dropped,) = db.execute(
                "SELECT value FROM counters WHERE name = 'dropped'"
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- figures ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """How many events the spool holds."""
        return int(self._depth)

    @property
    def bytes(self) -> int:
        """How many bytes the spool's events take (their sizes, not the file's)."""
        return int(self._bytes)

    @property
    def dropped(self) -> int:
        """How many events were ever dropped to make room (kept across restarts)."""
        return int(self._dropped)

    # -- the queue -------------------------------------------------------------------------------

    def put(
        self, subject: str, payload: builtins.bytes, headers: Mapping[str, str] | None = None
    ) -> int:
        """Append an event; return its ``seq``. Drops the oldest events if the
        bounds require it (counted in :attr:`dropped`)."""
        return self.put_many([(subject, payload, headers)])[0]

    def put_many(
        self, events: Sequence[tuple[str, builtins.bytes, Mapping[str, str] | None]]
    ) -> list[int]:
        """Append ``(subject, payload, headers)`` events in one transaction; return
        their ``seq``. The same as :meth:`put` for each, in order, but one commit.
        A refused event (larger than the spool) refuses the whole call."""
        rows: list[tuple[str, str, builtins.bytes, int]] = []
        for subject, payload, headers in events:
            encoded = json.dumps(dict(headers or {}), separators=(",", ":"), sort_keys=True)
            size = len(subject.encode("utf-8")) + len(encoded.encode("utf-8")) + len(payload)
            if size > self.max_bytes:
                raise ValueError(
                    f"event of {size} bytes is larger than the spool ({self.max_bytes})"
                )
            rows.append((subject, encoded, bytes(payload), size))
        seqs: list[int] = []
        with self._lock:
            depth, nbytes, dropped = self._depth, self._bytes, self._dropped
            with self._transaction():
                db = self._db
                for row in rows:
                    drop, freed = self._room_for(row[3], depth, nbytes)
                    if drop:
                        db.execute(
                            "DELETE FROM events WHERE seq IN"
                            " (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                            (drop,),
                        )
                        db.execute(
                            "UPDATE counters SET value = value + ? WHERE name = 'dropped'",
                            (drop,),
                        )
                    cursor = db.execute(
                        "INSERT INTO events (subject, headers, payload, bytes) VALUES (?, ?, ?, ?)",
                        row,
                    )
                    assert cursor.lastrowid is not None
                    seqs.append(cursor.lastrowid)
                    depth += 1 - drop
                    nbytes += row[3] - freed
                    dropped += drop
            # Committed (the transaction raised otherwise): only now do the figures change.
            self._depth, self._bytes, self._dropped = depth, nbytes, dropped
        return seqs

    def _room_for(self, size: int, depth: int, nbytes: int) -> tuple[int, int]:
        """How many of the oldest events to drop, and their bytes, to fit ``size``
        more into ``depth`` events of ``nbytes``."""
        excess_events = depth + 1 - self.max_events
        excess_bytes = nbytes + size - self.max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return 0, 0
        drop = freed = 0
        for (nbytes,) in self._db.execute("SELECT bytes FROM events ORDER BY seq"):
            if drop >= excess_events and freed >= excess_bytes:
                break
            drop += 1
            freed += nbytes
        return drop, freed

    def peek_after(self, seq: int, n: int) -> list[SpooledEvent]:
        """The oldest ``n`` events after ``seq`` (those not yet sent), oldest first."""
        with self._lock:
            rows = self._execute(
                "SELECT seq, subject, headers, payload FROM events WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (seq, max(n, 0)),
            ).fetchall()
        return [SpooledEvent(seq, subject, json.loads(h), bytes(p)) for seq, subject, h, p in rows]

    def peek(self, n: int) -> list[SpooledEvent]:
        """The oldest ``n`` events (fewer if the spool holds fewer), oldest first."""
        with self._lock:
            rows = self._execute(
                "SELECT seq, subject, headers, payload FROM events ORDER BY seq LIMIT ?",
                (max(n, 0),),
            ).fetchall()
        return [SpooledEvent(seq, subject, json.loads(h), bytes(p)) for seq, subject, h, p in rows]

    def ack(self, upto_seq: int) -> int:
        """Remove every event up to and including ``upto_seq``; return how many."""
        with self._lock:
            with self._transaction():
                count, freed = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events WHERE seq <= ?",
                    (upto_seq,),
                ).fetchone()
                if count:
                    self._db.execute("DELETE FROM events WHERE seq <= ?", (upto_seq,))
            self._depth -= count
            self._bytes -= freed
        return int(count)

    # -- the file --------------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path) from exc

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)

    def close(self) -> None:
        """Close the file and release its lock; idempotent."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Spool {self.path}: {self._depth} events, {self._bytes} bytes,"
            f" {self._dropped} dropped>"
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception;
    SQLite's errors become :class:`SpoolError`."""

    __slots__ = ("_db", "_path")

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _wrap(exc, self._path) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._db.execute("COMMIT")
            elif self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            raise _wrap(err, self._path) from err
        if isinstance(exc, sqlite3.Error):
            raise _wrap(exc, self._path) from exc
