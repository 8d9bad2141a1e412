"""Key-ordered record cursors over Caffe's databases, wrapping around like Caffe.

Caffe's Data layer walks its database with one cursor in key order and seeks back
to the first record when it runs off the end, so batch k of a TEST net is a fixed
slice of that endless cycle. `RecordCursor` reproduces that walk for LMDB (the
`lmdb` package; keys compare as bytes, as in Caffe) and for LevelDB through the
optional `plyvel` binding (bytewise comparator, as Caffe's). Errors name the path
and, for a record, its key; a database given with the wrong backend says which
backend its files look like. Readers of one database share one open handle (see
`_SharedHandles`), so any number of nets and tools may read it at once.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

import lmdb

from ..errors import DataError
from ..proto import caffe_pb2

LMDB = caffe_pb2.DataParameter.LMDB
LEVELDB = caffe_pb2.DataParameter.LEVELDB
BACKENDS = {"lmdb": LMDB, "leveldb": LEVELDB}


def backend_value(name: str) -> int:
    """'lmdb' / 'leveldb' (any case) as the DataParameter.DB value."""
    try:
        return BACKENDS[name.lower()]
    except KeyError:
        raise DataError(f"unknown backend '{name}'; use lmdb or leveldb") from None


class RecordCursor:
    """An endless key-ordered walk over a database's (key, value) records."""

    def __init__(self, path: str, backend: int = LMDB):
        self.path = os.fspath(path)
        self.backend = backend
        _check_layout(self.path, backend)
        if backend == LMDB:
            self._store = _LmdbStore(self.path)
        else:
            self._store = _LevelDbStore(self.path)
        self._records = self._store.records()
        self._pending = self._first()

    def _first(self) -> tuple[bytes, bytes]:
        try:
            return next(self._records)
        except StopIteration:
            self.close()
            raise DataError(f"{self.path}: the database holds no records") from None

    def peek(self) -> tuple[bytes, bytes]:
        """The record `next` returns, without moving."""
        return self._pending

    def next(self) -> tuple[bytes, bytes]:
        """The current record; the cursor then moves on, back to the first at the end."""
        record = self._pending
        try:
            self._pending = next(self._records)
        except StopIteration:
            self._records = self._store.records()
            self._pending = self._first()
        return record

    def scan(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record once, in key order (independent of the endless walk)."""
        return self._store.records()

    def size_hint(self) -> int | None:
        """The number of records where the backend knows it cheaply."""
        return self._store.size_hint()

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.next()

    def where(self, key: bytes) -> str:
        """'path' and record key, for error messages."""
        return f"{self.path} record '{key.decode('utf-8', 'replace')}'"

    def close(self) -> None:
        self._store.close()


def _check_layout(path: str, backend: int) -> None:
    if not os.path.exists(path):
        name = "LMDB" if backend == LMDB else "LevelDB"
        raise DataError(f"{path}: no such {name} database (directory not found)")
    if not os.path.isdir(path):
        raise DataError(f"{path}: is a file; a database is a directory")
    looks_lmdb = os.path.exists(os.path.join(path, "data.mdb"))
    looks_leveldb = os.path.exists(os.path.join(path, "CURRENT"))
    if backend == LEVELDB and looks_lmdb:
        raise DataError(f"{path}: this is an LMDB but data_param.backend is LEVELDB "
                        "(Caffe's default when backend is not given); add "
                        "'backend: LMDB' to data_param")
    if backend == LMDB and not looks_lmdb:
        hint = "; it looks like a LevelDB: use 'backend: LEVELDB'" if looks_leveldb else ""
        raise DataError(f"{path}: not an LMDB (no data.mdb){hint}")


class _SharedHandles:
    """One open handle per database and process, shared by all its readers.

    The lmdb package refuses to open an environment twice in a process (and a
    LevelDB locks itself), while a TRAIN and a TEST net, or a net and
    compute-image-mean, may well read the same database: each reader gets its own
    transaction or snapshot on the shared handle, closed with the last reader.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, list] = {}       # real path -> [handle, readers]

    def acquire(self, path: str, opener: Callable[[str], object]):
        key = os.path.realpath(path)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [opener(path), 0]
            entry[1] += 1
            return entry[0]

    def release(self, path: str) -> None:
        """`path` as acquired: readers pass it absolute, resolved when they open, so
        that a chdir in between cannot change which handle it names."""
        key = os.path.realpath(path)
        with self._lock:
            entry = self._open[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                entry[0].close()


_HANDLES = _SharedHandles()


class _LmdbStore:
    """A read transaction held open for the cursor's life, as Caffe holds one."""

    def __init__(self, path: str):
        self.path, self._key = path, os.path.abspath(path)
        self.env = _HANDLES.acquire(self._key, _open_lmdb)
        try:
            self.txn = self.env.begin(buffers=False)
        except lmdb.Error as e:
            _HANDLES.release(self._key)
            raise DataError(f"{path}: cannot read the LMDB ({e})") from None

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from self.txn.cursor()
        except lmdb.Error as e:     # liblmdb found a damaged page while walking
            raise DataError(f"{self.path}: the LMDB is damaged ({e})") from None

    def size_hint(self) -> int | None:
        try:
            return self.txn.stat()["entries"]
        except lmdb.Error as e:
            raise DataError(f"{self.path}: the LMDB is damaged ({e})") from None

    def close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
            _HANDLES.release(self._key)


def _open_lmdb(path: str) -> lmdb.Environment:
    """Open read-only; without write access to lock.mdb fall back to no locking,
    as Caffe built with ALLOW_LMDB_NOLOCK does."""
    try:
        return lmdb.open(path, readonly=True, lock=True)
    except lmdb.Error as e:
        if "ermission" not in str(e) and not isinstance(e, lmdb.ReadonlyError):
            raise DataError(f"{path}: cannot open the LMDB ({e})") from None
    try:
        return lmdb.open(path, readonly=True, lock=False)
    except lmdb.Error as e:
        raise DataError(f"{path}: cannot open the LMDB ({e})") from None


class _LevelDbStore:
    """A snapshot of a LevelDB read through plyvel, when that binding is installed."""

    def __init__(self, path: str):
        self.path, self._key = path, os.path.abspath(path)
        self.snapshot = _HANDLES.acquire(self._key, _open_leveldb).snapshot()

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        return self.snapshot.iterator()

    def size_hint(self) -> int | None:
        return None

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None
            _HANDLES.release(self._key)


def _open_leveldb(path: str):
    plyvel = import_plyvel()
    try:
        return plyvel.DB(path, create_if_missing=False)
    except plyvel.Error as e:
        detail = e.args[0].decode("utf-8", "replace") if e.args and isinstance(
            e.args[0], bytes) else str(e)
        hint = ("; another process (Caffe?) holds it: a LevelDB admits one process "
                "at a time, an LMDB many") if "lock" in detail else ""
        raise DataError(f"{path}: cannot open the LevelDB ({detail}){hint}") from None


def import_plyvel():
    """The plyvel module, or a DataError explaining how to do without it."""
    try:
        import plyvel
    except ImportError:
        raise DataError("LevelDB needs the optional 'plyvel' package (pip install "
                        "plyvel); or use LMDB: convert with `protonet convert-imageset "
                        "--backend lmdb` and set 'backend: LMDB'") from None
    return plyvel
