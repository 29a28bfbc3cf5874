# One node's replica store: a LevelDB directory (plyvel) holding CRDT states by key.
# Lives here: the on-disk layout, the batched merge path with group commit, partition scans,
# drops and counts, and the per-partition anti-entropy metadata (hash tree and key counts) that is
# kept in step with every write.
# Must not live here: CRDT semantics (the merge function is passed in), membership, networking,
# the exchange protocol.
#
# Layout: stored key = 3-byte keyspace prefix (partition bits, then segment bits) + key, so a
# partition and a segment are each one contiguous range; value = the canonical encoded state,
# unchanged. Two records sort before every stored key (they are shorter than 3 bytes): b"\x00"
# pins the key space the directory was created with, b"\x00\x00" holds a hash-tree snapshot.
# The hash tree (with per-partition key counts) lives in memory. close() saves it as the snapshot;
# open() loads the snapshot and deletes it (synced) before any write, so it is used only after a
# clean close. After a crash there is no snapshot and open() rebuilds the tree by one full scan:
# the data is the only truth on disk, and no crash can leave the tree out of step with it.
# LevelDB drops the tail of a truncated .log without an error, so close() also leaves a small
# file beside the data (CLOSE_RECORD: the key count and a digest of the tree), written atomically
# after the snapshot; open() reads and removes it before any write and compares it with what it
# finds: `Store.opened` says whether the store is new, was closed cleanly, was not (a kill or a
# crash: unknown), or lost data. Opening refuses a damaged directory with StoreOpenError (one
# line: the directory, what is wrong, what to do); `open_leveldb` does that for other LevelDBs.
# Not thread-safe: one owner (one trio task or one thread) at a time.
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import plyvel

from .keyspace import PREFIX_BYTES, Keyspace
from .merkle import HashTree

WriteBatch = Any  # plyvel's write batch (plyvel has no type hints)

Merge = Callable[[bytes | None, bytes], bytes]


class Pending(Protocol):
    """A key's new state that an update may return instead of its bytes (a decoded state a
    caller keeps across the batch's updates of the key): the next update of the key is given
    it as it is, and `finish` makes its bytes once, when something needs them (a delta to
    merge into it, or the end of the plan)."""

    def finish(self) -> bytes: ...


# current state (bytes, or what an earlier update of the same batch returned) -> new state
# (None: unchanged)
Update = Callable[[Any], "bytes | Pending | None"]

_META_KEY = b"\x00"
_TREE_KEY = b"\x00\x00"
_FORMAT = b"tasknet-store/1:"
_FIRST_STORED_KEY = bytes(PREFIX_BYTES)
DEFAULT_CACHE_BYTES = 64 << 20
DEFAULT_BLOOM_BITS = 10
DEFAULT_WRITE_BUFFER = 16 << 20
# every option a Store opens LevelDB with, besides the path and create_if_missing (the sizes
# are the defaults of Store's arguments); benchmarks open their raw reference with them too
LEVELDB_OPTIONS: dict[str, Any] = {
    "paranoid_checks": True, "compression": None, "bloom_filter_bits": DEFAULT_BLOOM_BITS,
    "lru_cache_size": DEFAULT_CACHE_BYTES, "write_buffer_size": DEFAULT_WRITE_BUFFER,
}


class StoreError(Exception):
    """The store cannot be opened or read or written (the message says which and why)."""


class StoreOpenError(StoreError):
    """A LevelDB directory cannot be opened: it is damaged or is not what it should be. The
    message is one line naming the directory, what is wrong and what the operator can do."""


CLOSE_RECORD = "tasknet-closed.json"
MOVE_ASIDE = ("move the directory aside and restart: the node refills its replicas from the "
              "others by anti-entropy")
_TABLE_LINE = re.compile(rb"^\s*(\d+):(\d+)\[", re.M)  # leveldb.sstables: " number:size[..."
_LEVELDB_FILE = re.compile(r"^(\d+\.(log|ldb|sst)|MANIFEST-\d+)$")


def open_leveldb(path: str, *, create: bool, what: str, advice: str = MOVE_ASIDE,
                 **options: Any) -> Any:
    """plyvel.DB(path) with `options`, or StoreOpenError if the directory is damaged: LevelDB
    refuses it, its CURRENT file is gone while its data files are there (LevelDB would start
    an empty database beside them), or a table file is shorter than LevelDB's manifest says
    (LevelDB would notice only when reading it). `what` names the database in messages."""
    def fail(problem: str) -> StoreOpenError:
        return StoreOpenError(f"cannot open {what} {path}: {problem}; {advice}")

    try:
        names = os.listdir(path)
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    if "CURRENT" not in names and any(_LEVELDB_FILE.match(n) for n in names):
        raise fail("its CURRENT file is missing (LevelDB files are there without it)")
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        db = plyvel.DB(path, create_if_missing=create, **options)
    except (plyvel.Error, OSError) as exc:
        message = _describe(exc)
        if "lock" in message.lower():  # not damage: another process has it open
            raise StoreOpenError(f"cannot open {what} {path}: {message}") from exc
        raise fail(message) from exc
    try:
        tables = db.get_property(b"leveldb.sstables") or b""
        for number, size in _TABLE_LINE.findall(tables):
            name = f"{int(number):06d}.ldb"
            if not os.path.exists(os.path.join(path, name)):
                name = f"{int(number):06d}.sst"  # the name older LevelDB versions wrote
            try:
                found = os.path.getsize(os.path.join(path, name))
            except OSError as exc:
                raise fail(f"table {name}: {exc.strerror or exc}") from None
            if found != int(size):
                raise fail(f"table {name} holds {found} bytes where LevelDB wrote {int(size)} "
                           "(truncated or overwritten)")
    except BaseException:
        db.close()
        raise
    return db


@dataclass(frozen=True)
class OpenReport:
    """How a store was found at open. `state`: "new" (created now), "clean" (as its last
    clean close left it), "unclean" (not closed cleanly since it was last opened: a kill or a
    crash; whether writes were lost is unknown), "lost" (closed cleanly, but found holding
    other data than it closed with: LevelDB dropped records)."""

    state: str
    found_keys: int
    expected_keys: int | None = None

    @property
    def needs_repair(self) -> bool:
        return self.state in ("unclean", "lost")

    def describe(self, path: str) -> str:
        if self.state == "lost":
            return (f"store {path} lost data since its last clean close: {self.expected_keys} "
                    f"keys expected, {self.found_keys} found")
        if self.state == "unclean":
            return (f"store {path} was not closed cleanly (the node was killed or crashed): "
                    f"{self.found_keys} keys found, whether writes were lost is unknown")
        return f"store {path}: {self.found_keys} keys ({self.state})"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_digest(snapshot: bytes) -> str:
    return hashlib.blake2s(snapshot).hexdigest()


def _take_close_record(path: str) -> dict[str, Any] | None:
    """The record of the last clean close (None: there is none or it is unreadable), removed
    from disk for good before the store is written: a later kill leaves no record behind."""
    file = os.path.join(path, CLOSE_RECORD)
    try:
        with open(file, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    os.unlink(file)
    _fsync_dir(path)
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if (not isinstance(record, dict) or type(record.get("keys")) is not int
            or not isinstance(record.get("tree"), str)):
        return None
    return record


def _write_close_record(path: str, keys: int, snapshot: bytes) -> None:
    file = os.path.join(path, CLOSE_RECORD)
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps({"keys": keys, "tree": _tree_digest(snapshot)}).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_dir(path)


class CorruptRecord(StoreError):
    """The merge (decoder) rejected the stored state or the incoming delta of this key.

    `where` says which: "stored state" or "delta"; `cause` is the merge's exception."""

    def __init__(self, key: bytes, where: str, cause: BaseException) -> None:
        super().__init__(f"corrupt {where} for key {key!r}: {cause!r}")
        self.key = key
        self.where = where
        self.cause = cause


def _changes(before: dict[bytes, bytes | None], after: dict[bytes, Any]
             ) -> dict[bytes, tuple[bytes | None, bytes]]:
    """stored key -> (state before, state after) for the keys of `after` (None there: not
    written), in the order of `before`."""
    return {stored: (old, new) for stored, old in before.items()
            if (new := after.get(stored)) is not None}


def _describe(exc: BaseException) -> str:
    """plyvel reports LevelDB's status as bytes; make it a readable message."""
    if exc.args and isinstance(exc.args[0], bytes):
        return exc.args[0].decode(errors="replace")
    return str(exc)


@dataclass
class PlannedWrite:
    """A merged batch not yet written: stored key -> (state before, state after), and the
    merged state of every input item in order."""

    changed: dict[bytes, tuple[bytes | None, bytes]]
    states: list[Any]


class Store:
    """CRDT states by key in one LevelDB directory, with group-committed batched merges."""

    def __init__(self, path: str | os.PathLike[str], merge: Merge,
                 keyspace: Keyspace | None = None, *, create: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, bloom_bits: int = DEFAULT_BLOOM_BITS,
                 write_buffer: int = DEFAULT_WRITE_BUFFER) -> None:
        self.path = os.fspath(path)
        self.keyspace = keyspace if keyspace is not None else Keyspace()
        self._merge = merge
        existed = os.path.exists(os.path.join(self.path, "CURRENT"))
        self._db = open_leveldb(self.path, create=create, what="store", **{
            **LEVELDB_OPTIONS, "bloom_filter_bits": bloom_bits, "lru_cache_size": cache_bytes,
            "write_buffer_size": write_buffer})
        try:
            record = _take_close_record(self.path)
            self._check_meta()
            self.tree, snapshot = self._load_tree()
        except OSError as exc:
            self._db.close()
            raise StoreOpenError(f"cannot open store {self.path}: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        found = self.tree.total()
        if record is None:
            self.opened = OpenReport("unclean" if existed else "new", found)
        elif _tree_digest(snapshot or self.tree.to_bytes()) != record["tree"]:
            self.opened = OpenReport("lost", found, record["keys"])
        else:
            self.opened = OpenReport("clean", found, record["keys"])

    def _error(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(f"{action} failed in store {self.path}: {_describe(exc)}")

    def _check_meta(self) -> None:
        meta = _FORMAT + self.keyspace.fingerprint
        try:
            found = self._db.get(_META_KEY)
            if found is None:
                if next(self._db.iterator(include_value=False), None) is not None:
                    raise StoreError(f"{self.path} holds data but no tasknet store metadata")
                self._db.put(_META_KEY, meta, sync=True)
            elif found != meta:
                raise StoreError(f"{self.path} was created with another key space or format "
                                 f"({found!r}, expected {meta!r})")
        except plyvel.Error as exc:
            raise self._error("metadata read", exc) from exc

    def _load_tree(self) -> tuple[HashTree, bytes | None]:
        """The hash tree, and the snapshot it was loaded from (None: built by a scan)."""
        try:
            snapshot = self._db.get(_TREE_KEY)
            if snapshot is not None:
                self._db.delete(_TREE_KEY, sync=True)
        except plyvel.Error as exc:
            raise self._error("tree snapshot read", exc) from exc
        if snapshot is not None:
            try:
                return HashTree.from_bytes(self.keyspace, snapshot), snapshot
            except ValueError:
                pass  # unusable snapshot: the scan below is always right
        return self._scan(), None

    def rebuild_tree(self) -> None:
        """Recompute the hash tree and counts by a full scan (what open does after a crash)."""
        self.tree = self._scan()

    def _scan(self) -> HashTree:
        try:
            with self._db.iterator(start=_FIRST_STORED_KEY) as entries:
                return HashTree.build(self.keyspace, entries)
        except plyvel.Error as exc:
            raise self._error("scan", exc) from exc

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Save the hash tree snapshot and close; closing twice is harmless."""
        if self._db.closed:
            return
        snapshot = self.tree.to_bytes()
        try:
            self._db.put(_TREE_KEY, snapshot, sync=True)
        except plyvel.Error as exc:
            raise self._error("tree snapshot write", exc) from exc
        finally:
            self._db.close()
        try:
            _write_close_record(self.path, self.tree.total(), snapshot)
        except OSError as exc:
            raise StoreError(f"close record write failed in store {self.path}: {exc}") from exc

    @property
    def closed(self) -> bool:
        return bool(self._db.closed)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------

    def apply_deltas(self, items: Iterable[tuple[bytes, bytes]], sync: bool = True) -> list[bytes]:
        """Merge each (key, delta) into the stored state; return the new states, in order.

        The whole batch is one LevelDB write (one fsync when sync is true): when this returns,
        every state is durable; when it raises, nothing of the batch was written. A key may
        appear several times in a batch; later deltas merge into the earlier result.
        Raises CorruptRecord (naming the key) when the merge rejects a stored state or a delta."""
        planned = self.plan_deltas(items)
        self._commit(planned, sync)
        return planned.states

    def plan_deltas(self, items: Iterable[tuple[bytes, bytes]]) -> PlannedWrite:
        """The first step of `apply_deltas`: read and merge, write nothing. Then call
        `fill_planned` (the batch, in the owner's thread), `write_filled` (the disk write:
        it touches only LevelDB, so it may run in a worker thread while the owner goes on
        reading) and then `record_planned` (the hash tree, in the owner's thread); or
        `write_planned` for the first two at once. Between plan and record the owner must
        plan and write nothing else, or the plan's "before" states go stale."""
        return self.plan_updates(items)

    def plan_updates(self, items: Iterable[tuple[bytes, Update | bytes]]) -> PlannedWrite:
        """Like `plan_deltas`, but an item may instead carry a function of the key's current
        state that returns its new state (None: leave the key as it is); any other item is an
        encoded delta to merge (see `merge_checked`). `states` holds each item's new state.
        Exceptions from the functions propagate unchanged. A function may return a `Pending`
        state: the key's next update gets it as it is, so that a run of updates of one key
        works on one decoded state, encoded once (`states` then holds it, not bytes)."""
        items = list(items)
        stored_keys, before = self._read_batch([key for key, _ in items])
        current: dict[bytes, Any] = before.copy()
        updated: dict[bytes, Any] = {}
        results: list[Any] = []
        merge = self._merge
        append = results.append
        for (key, update), stored in zip(items, stored_keys, strict=True):
            # a delta is merged here, by the merge function itself (what merge_checked does,
            # inlined), rather than through a closure or a method per item: replicas merge
            # hundreds of them per batch
            old = current[stored]
            if callable(update):
                new = update(old)
            else:
                if old is not None and type(old) is not bytes:  # a Pending state
                    old = old.finish()
                try:
                    new = merge(old, update)
                except Exception as exc:
                    raise CorruptRecord(key, self._blame(old), exc) from exc
            append(new)
            if new is not None:
                current[stored] = updated[stored] = new
        for stored, new in list(updated.items()):
            if type(new) is not bytes:
                finished = updated[stored] = new.finish()
                if finished == before[stored]:  # kept for the updates after it, unchanged
                    del updated[stored]
        return PlannedWrite(_changes(before, updated), results)

    def _read_batch(self, keys: list[bytes]) -> tuple[list[bytes], dict[bytes, bytes | None]]:
        """The stored key of each key, in order, and the state of each distinct stored key,
        read in stored-key order (random LevelDB reads are cheaper sorted: consecutive reads
        share index and data blocks) and kept in that order."""
        new_hasher = self.keyspace.prefix_hasher.copy
        stored_keys: list[bytes] = []
        append = stored_keys.append
        for key in keys:
            hasher = new_hasher()
            hasher.update(key)
            append(hasher.digest() + key)
        get = self._db.get
        try:
            states = {stored: get(stored) for stored in sorted(set(stored_keys))}
        except plyvel.Error as exc:
            raise self._error("read", exc) from exc
        return stored_keys, states

    def write_planned(self, planned: PlannedWrite, sync: bool = True) -> None:
        """Write a planned batch in one LevelDB write (one fsync when `sync`)."""
        self.write_filled(self.fill_planned(planned, sync))

    def fill_planned(self, planned: PlannedWrite, sync: bool = True) -> WriteBatch:
        """The LevelDB batch of a planned write, filled but not written: the Python work
        of a write, for the owner's thread, so that a worker thread that runs `write_filled`
        holds the interpreter's lock only to start and end it (LevelDB writes without it).
        A batch that is never written leaves nothing behind."""
        batch = self._db.write_batch(sync=sync)
        put = batch.put
        for stored, (before, after) in planned.changed.items():
            if before != after:
                put(stored, after)
        return batch

    def write_filled(self, batch: WriteBatch) -> None:
        """Write a batch from `fill_planned` in one LevelDB write (one fsync if synced)."""
        try:
            batch.write()
        except plyvel.Error as exc:
            raise self._error("write", exc) from exc

    def record_planned(self, planned: PlannedWrite) -> None:
        """Account a written batch in the hash tree and key counts."""
        self.tree.record(planned.changed.items())

    def merge_checked(self, key: bytes, old: bytes | None, delta: bytes) -> bytes:
        """The store's merge of one delta, raising CorruptRecord (naming the key) as
        `apply_deltas` does."""
        try:
            return self._merge(old, delta)
        except Exception as exc:
            raise CorruptRecord(key, self._blame(old), exc) from exc

    def _blame(self, old: bytes | None) -> str:
        """Which input of a failed merge is corrupt: the stored state if it fails on its own."""
        if old is not None:
            try:
                self._merge(None, old)
            except Exception:
                return "stored state"
        return "delta"

    def put_state(self, key: bytes, state: bytes, sync: bool = True) -> None:
        """Store a state as it is, replacing (not merging with) what was there."""
        self.put_states([(key, state)], sync)

    def put_states(self, items: Iterable[tuple[bytes, bytes]], sync: bool = True) -> None:
        """Store (key, state) pairs as they are, in one write; the last state of a key wins."""
        prefix = self.keyspace.prefix
        get = self._db.get
        changed: dict[bytes, tuple[bytes | None, bytes]] = {}
        try:
            for key, state in items:
                stored = prefix(key) + key
                entry = changed.get(stored)
                changed[stored] = (get(stored) if entry is None else entry[0], state)
        except plyvel.Error as exc:
            raise self._error("read", exc) from exc
        self._commit(PlannedWrite(changed, []), sync)

    def _commit(self, planned: PlannedWrite, sync: bool) -> None:
        self.write_planned(planned, sync)
        self.record_planned(planned)

    def drop_partition(self, partition: int, sync: bool = True) -> int:
        """Delete every key of a partition (one batch); return how many were deleted."""
        start, stop = self.keyspace.partition_range(partition)
        try:
            with (self._db.write_batch(sync=sync) as batch,
                  self._db.iterator(start=start, stop=stop, include_value=False) as stored_keys):
                dropped = 0
                for stored in stored_keys:
                    batch.delete(stored)
                    dropped += 1
        except plyvel.Error as exc:
            raise self._error(f"drop of partition {partition}", exc) from exc
        self.tree.clear_partition(partition)
        return dropped

    def delete_if(self, items: Iterable[tuple[bytes, bytes]], sync: bool = True) -> list[bytes]:
        """Delete each key whose stored state is exactly the expected one (one batch), keeping
        the hash tree and counts in step; return the keys deleted."""
        prefix = self.keyspace.prefix
        removed: dict[bytes, bytes] = {}
        try:
            for key, expected in items:
                stored = prefix(key) + key
                if stored not in removed and self._db.get(stored) == expected:
                    removed[stored] = expected
            with self._db.write_batch(sync=sync) as batch:
                for stored in removed:
                    batch.delete(stored)
        except plyvel.Error as exc:
            raise self._error("conditional delete", exc) from exc
        self.tree.forget(removed.items())
        return [stored[PREFIX_BYTES:] for stored in removed]

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        try:
            state: bytes | None = self._db.get(self.keyspace.prefix(key) + key)
        except plyvel.Error as exc:
            raise self._error("read", exc) from exc
        return state

    def iterate(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, state) of every key in a partition, from one consistent snapshot."""
        start, stop = self.keyspace.partition_range(partition)
        yield from self._range(start, stop)

    def read_segment(self, partition: int, segment: int) -> list[tuple[bytes, bytes]]:
        """(key, state) of every key in one anti-entropy segment."""
        start, stop = self.keyspace.segment_range(partition, segment)
        return list(self._range(start, stop))

    def _range(self, start: bytes, stop: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        try:
            with self._db.iterator(start=start, stop=stop) as entries:
                for stored, state in entries:
                    yield stored[PREFIX_BYTES:], state
        except plyvel.Error as exc:
            raise self._error("scan", exc) from exc

    def count(self, partition: int) -> int:
        self.keyspace.check_partition(partition)
        return self.tree.count(partition)

    def __len__(self) -> int:
        return self.tree.total()
