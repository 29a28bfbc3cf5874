# The embedded ledger: tasknet's default chain, nothing to install. One SQLite file (WAL mode)
# that every node process on one machine shares: an append-only, hash-chained log of signed
# transactions that `chain.rules` accepted, so the chain's state is exactly the replay of its
# entries through `chain.rules.apply`. Also `LedgerAdapter`, the ledger behind the async
# `chain.adapter.ChainAdapter` interface.
# Lives here: the file layout, appending (one writer at a time, across processes, through
# SQLite's write lock), replaying and verifying entries, snapshots, the localnet faucet.
# Must not live here: what a transaction does (chain/rules.py decides, and refuses), the node's
# use of the chain (tasks/), any other chain (chain/adapter.py is the interface they share).
#
# File layout (`ledger.sqlite`, schema "tasknet-ledger-1"):
#   entries(idx PK, prev, slot, tx, pubkey, sig, sender, nonce)
#     idx 0 is the genesis entry: tx is the canonical msgpack genesis document (chain id,
#     slot_ms, balances, faucet account or nil, format), pubkey and sig are empty, prev is 32
#     zero bytes. Entry i > 0: prev = hash(entry i-1), slot = the chain time it was applied with
#     (wall clock in slot_ms units chosen by its writer, never below entry i-1's), tx = the
#     canonical msgpack transaction (with its nonce), pubkey = the sender's raw Ed25519 key,
#     sig = Ed25519 over msgpack([SIGN_DOMAIN, chain id, nonce, tx]). sender (the libp2p peer
#     id of pubkey) and nonce are copies for readers, not hashed, and not indexed: the rules
#     already take one entry per (sender, nonce), and an index would add a page in a random
#     place to every append's commit (files made before carry entries_sender_nonce; harmless).
#     hash(entry) = sha256(msgpack([idx, prev, slot, tx, pubkey, sig])).
#   head(idx, hash): the last entry, updated in the same transaction as each append, so a file
#     whose last entries were cut off is told apart from a shorter ledger.
#   snapshots(idx PK, entry_hash, digest, state): `ChainState.to_bytes()` after entry idx,
#     written by whoever appends an entry whose idx is a multiple of meta.snapshot_every.
#   meta(key PK, value): format, snapshot_every.
# Opening loads the latest snapshot (its entry's hash and the state's sha256 must match) and
# replays the tail after it, checking every link, signature and the rules on each entry, then
# the head record. `verify()` does the same from genesis and compares every snapshot.
#
# Appending: replay what others appended if this Ledger has not looked for STALE_LOOK_S;
# encode the transaction with the sender's next nonce (as of this Ledger's last look) and
# sign it, outside the lock; take the write lock on a second connection kept for
# appends, its busy handler off (BEGIN IMMEDIATE, tried again after pauses until busy_timeout:
# see LOCK_PAUSES_S), replaying what other writers commit meanwhile through the reading one;
# replay what slipped in since the last look; sign again only if the sender's nonce moved;
# apply the rules, insert the entry, the head (and a snapshot, only over checked entries),
# COMMIT. Other writers' entries are replayed without their signatures while waiting and
# under the lock, and checked after it is released (about 40 us an entry, the costly part;
# a large batch at a lower CPU priority, see BACKGROUND_CHECK_NICE), before append returns: the
# lock is held for little more than this entry, and a forged one fails the append as corrupt.
# A refused transaction rolls back: no entry. A writer killed mid-append leaves nothing (its
# WAL frames never commit); a transaction sent again carries a used nonce and is refused
# (bad_nonce).
# Localnet, LOCAL ONLY: `open_localnet` gives the whole supply to a faucet whose key lies in the
# ledger dir, so anyone who can read that dir can spend it; a real chain has no such key.
#
# Durability: synchronous=FULL in WAL mode: an append's COMMIT fsyncs the WAL, so a receipt
# survives a power cut, not only a killed process (NORMAL would survive only the latter).
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgpack
import trio

from p2p.identity import (
    KEY_FILE_NAME,
    Identity,
    load_or_create_identity,
    peer_id_from_public_key,
    verify_signature,
)

from . import rules
from .adapter import ChainAdapter, ChainError, ChainUnavailable, Receipt
from .merkle import LEDGER_LEAVES
from .rules import ChainState, Refused

FORMAT = "tasknet-ledger-2"  # 2: the settlement rules of docs/evm-settlement.md
SIGN_DOMAIN = "tasknet-ledger-tx-1"
LEDGER_FILE_NAME = "ledger.sqlite"
FAUCET_DIR_NAME = "faucet"  # <ledger dir>/faucet/node.key: the localnet faucet's key
DEFAULT_SLOT_MS = 1000
DEFAULT_SNAPSHOT_EVERY = 1000
DEFAULT_LOCALNET_SUPPLY = 10**15
DEFAULT_BUSY_TIMEOUT = 30.0  # seconds an append may wait for the write lock in all
# Waiting for the write lock (Ledger._begin_immediate): BEGIN IMMEDIATE is tried after pauses
# that grow as SQLite's own busy handler's do, which lets a writer that holds the lock take it
# again at once (every hand-over costs: the new holder's pages, what it has to replay, the old
# holder's pause); a writer that has waited LOCK_KNOCK_AFTER_S tries every LOCK_KNOCK_S, so that
# none waits long. With 5 writers saturating one file (benchmarks/rounds.py): knocking after 1 s
# keeps the rate with the slowest append at 1.1-1.7 s; never, the same rate and 2-3 s; after
# 0.25 s, 0.5 s but 8% less. Checking signatures while waiting (instead of after the writer's
# own commit) shares the lock out (the writer with the fewest appends made ~1,000 in 5 s instead
# of ~10, the slowest took 1.2 s) but costs ~4% of the rate (10 alternated runs each): left out,
# since nodes append a few transactions a round and never saturate the file. A queue that the
# holder commits in one go with its own entry (a group commit) was tried: 55-80% of the rate, as
# measured. On 2 cores every process then reads every commit (SQLite drops a connection's page
# cache whenever another one wrote) and the queue's own writes cost what the shared fsyncs save.
LOCK_PAUSES_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)
LOCK_KNOCK_AFTER_S = 1.0
LOCK_KNOCK_S = 0.001
# Checking other writers' signatures is background work. A writer that waited for the lock has
# their entries to check after its own commit (thousands when 5 writers saturate the file),
# while another process holds the lock and needs a core for its next commit. A batch of
# BACKGROUND_CHECK_FROM entries or more is checked on a thread of the Ledger's own whose nice
# value is BACKGROUND_CHECK_NICE above the process's (Linux, where the nice value is a thread's;
# elsewhere inline), so that the holder's commits go first; append still returns only once they
# are checked. benchmarks/rounds.py (5 writers, 2 cores, 15 alternated runs each): ledger_ratio
# 0.55-0.67 (mean 0.61) against 0.48-0.58 (mean 0.52) with every batch checked inline; the
# slowest append takes ~2 s instead of ~1.5 s (a writer's own backlog waits longer). Nice +5
# did not help; +19 and SCHED_IDLE did as much as +10 but starve sooner on a busy machine.
# Smaller batches are checked inline: handing one over costs about as much as checking one.
# Only appends use the thread: while it holds the GIL (a few us of Python per entry) and is
# not scheduled, the process's other threads wait, so `refresh` (a node's polling, next to its
# event loop) checks inline, and a node that polls every 20 ms has small batches anyway.
BACKGROUND_CHECK_FROM = 16
BACKGROUND_CHECK_NICE = 10
# An append signs before the lock without looking at the file (a look costs a query, and a
# writer that keeps appending has just looked); a Ledger whose last look is older than
# STALE_LOOK_S replays what others appended meanwhile first, so as not to replay a long
# backlog under the lock.
STALE_LOOK_S = 0.1
OPEN_BUSY_PAUSE_S = 0.01  # between tries to open a file another connection keeps busy
SQLITE_BUSY_WAIT_S = 1.0  # at most: SQLite's own busy handler's wait, per statement
ZERO_HASH = bytes(32)
_T = TypeVar("_T")
log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    prev BLOB NOT NULL,
    slot INTEGER NOT NULL,
    tx BLOB NOT NULL,
    pubkey BLOB NOT NULL,
    sig BLOB NOT NULL,
    sender TEXT,
    nonce INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS snapshots (
    idx INTEGER PRIMARY KEY,
    entry_hash BLOB NOT NULL,
    digest BLOB NOT NULL,
    state BLOB NOT NULL
) STRICT;
"""
_ROW = "SELECT idx, prev, slot, tx, pubkey, sig, sender, nonce FROM entries"


class LedgerError(ChainError):
    """The ledger cannot be used as asked (no such file, one already there, no faucet)."""


class LedgerCorrupt(ChainError):
    """The file is not a valid ledger; the message is one line naming the first bad entry."""


class LedgerBusy(ChainUnavailable):
    """The write lock was not obtained within the busy timeout; nothing was appended."""


# --- encoding ------------------------------------------------------------------------------

def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("map keys must be strings")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """Canonical msgpack: maps with sorted string keys, tuples as arrays, bytes as bin."""
    return msgpack.packb(_canonical(value), use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)


def signing_bytes(chain_id: str, nonce: int, tx: bytes) -> bytes:
    """What a sender signs: the chain, its nonce and the encoded transaction (an array of
    scalars, so msgpack's own encoding is the canonical one: no _canonical pass)."""
    return msgpack.packb([SIGN_DOMAIN, chain_id, nonce, tx], use_bin_type=True)


def entry_hash(idx: int, prev: bytes, slot: int, tx: bytes, pubkey: bytes, sig: bytes) -> bytes:
    # scalars only, as in signing_bytes: the same bytes as encode() gives, without its pass
    return hashlib.sha256(msgpack.packb([idx, prev, slot, tx, pubkey, sig],
                                        use_bin_type=True)).digest()


def tx_hash(pubkey: bytes, signed: bytes) -> bytes:
    """A transaction's id: its sender's key and what it signed (chain, nonce, content)."""
    return hashlib.sha256(pubkey + signed).digest()


def account_of(public_key: bytes) -> str:
    """The ledger account of an Ed25519 public key: its libp2p peer id (base58)."""
    return peer_id_from_public_key(public_key).to_base58()


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    slot_ms: int
    balances: dict[str, int]
    faucet: str | None  # the localnet faucet's account (its key is in the ledger dir), or None

    def to_doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "chain_id": self.chain_id, "slot_ms": self.slot_ms,
                "balances": dict(self.balances), "faucet": self.faucet}

    @classmethod
    def from_doc(cls, doc: Any) -> Genesis:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a tasknet genesis document")
        chain_id, slot_ms, balances, faucet = (
            doc.get("chain_id"), doc.get("slot_ms"), doc.get("balances"), doc.get("faucet"))
        if not isinstance(chain_id, str) or not isinstance(slot_ms, int) or slot_ms < 1:
            raise ValueError("bad chain id or slot_ms")
        if not isinstance(balances, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and v >= 0
                for k, v in balances.items()):
            raise ValueError("bad genesis balances")
        if faucet is not None and not isinstance(faucet, str):
            raise ValueError("bad faucet account")
        return cls(chain_id, slot_ms, balances, faucet)


@dataclass(frozen=True)
class Entry:
    """One decoded entry (index > 0) as `Ledger.entries()` yields it."""

    idx: int
    slot: int
    sender: str
    nonce: int
    tx: dict[str, Any]
    hash: bytes


@dataclass(frozen=True)
class _Signed:
    """A transaction ready to append: its canonical bytes, as decoded, its nonce, the bytes
    signed and the signature."""

    tx: bytes
    decoded: Any
    nonce: int
    message: bytes
    sig: bytes


class _Row(NamedTuple):  # a tuple: one per entry read, built in C
    idx: int
    prev: bytes
    slot: int
    tx: bytes
    pubkey: bytes
    sig: bytes
    sender: str | None
    nonce: int | None

    @property
    def hash(self) -> bytes:
        return entry_hash(self.idx, self.prev, self.slot, self.tx, self.pubkey, self.sig)


def _rows(cursor: sqlite3.Cursor) -> Iterator[_Row]:
    for r in cursor:
        yield _Row._make(r)


# --- replay --------------------------------------------------------------------------------

class _Replay:
    """A state and the entry it is at; applies the next entries, checking each one."""

    def __init__(self, path: Path, genesis: Genesis, state: ChainState, idx: int, hash_: bytes,
                 slot: int) -> None:
        self.path, self.genesis, self.state = path, genesis, state
        self.idx, self.hash, self.slot = idx, hash_, slot

    def check_signature(self, row: _Row, nonce: int) -> None:
        if not verify_signature(row.pubkey, signing_bytes(self.genesis.chain_id, nonce, row.tx),
                                row.sig):
            raise self.corrupt(row.idx, f"bad signature by {account_of(row.pubkey)}")

    def check_signatures(self, rows: list[_Row]) -> None:
        """Check the signatures of entries applied without theirs (apply(row, False))."""
        for row in rows:
            self.check_signature(row, int(row.nonce or 0))

    def corrupt(self, idx: int, what: str) -> LedgerCorrupt:
        return LedgerCorrupt(f"ledger {self.path} is corrupt at entry {idx}: {what}")

    def apply(self, row: _Row, check_signature: bool = True) -> None:
        """Apply the next entry, checking it (its signature too unless told not to: then
        the caller must call check_signature on it before it trusts what follows)."""
        expected = self.idx + 1
        if row.idx != expected:
            raise self.corrupt(expected, f"missing (the next entry is {row.idx})")
        if row.prev != self.hash:
            raise self.corrupt(row.idx, f"does not link to entry {self.idx} (previous hash "
                                        "differs: entry changed, removed or reordered)")
        if not isinstance(row.slot, int) or row.slot < self.slot:
            raise self.corrupt(row.idx, f"slot {row.slot} is before entry {self.idx}'s")
        if len(row.pubkey) != 32:
            raise self.corrupt(row.idx, "no sender public key")
        sender = account_of(row.pubkey)
        try:
            tx = decode(row.tx)
        except Exception as exc:
            raise self.corrupt(row.idx, f"transaction does not decode ({exc})") from None
        nonce = tx.get("nonce") if isinstance(tx, dict) else None
        if not isinstance(nonce, int) or isinstance(nonce, bool):
            raise self.corrupt(row.idx, "transaction has no nonce")
        if check_signature:
            self.check_signature(row, nonce)
        if row.sender != sender or row.nonce != nonce:
            raise self.corrupt(row.idx, "sender/nonce columns differ from the signed entry")
        try:
            rules.apply(self.state, sender, tx, row.slot)
        except Refused as exc:
            raise self.corrupt(row.idx, f"the rules refuse it on replay ({exc.reason}: "
                                        f"{exc.detail})") from None
        self.idx, self.hash, self.slot = row.idx, row.hash, row.slot


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- the ledger ----------------------------------------------------------------------------

class Ledger:
    """An open ledger file: its in-memory state and one SQLite connection.

    Not thread-safe: use it from one thread at a time (LedgerAdapter runs it in trio worker
    threads behind a CapacityLimiter(1)). Several `Ledger`s, in one process or many, may share
    a file; each catches up with the others' entries before it appends and when refreshed."""

    def __init__(self, path: Path, db: sqlite3.Connection, clock: Callable[[], float],
                 busy_timeout: float) -> None:
        # use Ledger.open / Ledger.create / Ledger.open_localnet
        self.path = path
        self._db = db
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None  # appends: opened by the first one
        self._background: ThreadPoolExecutor | None = None  # _check_signatures: at first use
        self._replay: _Replay | None = None
        self._data_version = -1
        self._looked_at = -math.inf  # time.monotonic() of the last replay from the file
        self._file_id: tuple[int, int] | None = None  # the reading connection's file
        self._background_broken = False  # the checking thread could not be used: inline
        self.snapshot_every = DEFAULT_SNAPSHOT_EVERY
        self.replayed = 0  # entries replayed by the last full load (after its snapshot)
        self._closed = False

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time,
             busy_timeout: float = DEFAULT_BUSY_TIMEOUT, use_snapshots: bool = True) -> Ledger:
        """Open an existing ledger, load its latest snapshot and replay the entries after it.
        Raises LedgerError when there is no ledger at `path`, LedgerCorrupt when it is bad."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}")
        ledger = cls(path, _connect(path, "rw", busy_timeout), clock, busy_timeout)
        try:
            try:
                ledger._file_id = _file_id(path)
            except OSError:
                raise LedgerError(f"no ledger at {path}") from None
            _while_busy(busy_timeout, lambda: ledger._load(use_snapshots))
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def create(cls, path: str | Path, *, balances: Mapping[str, int], chain_id: str | None = None,
               slot_ms: int = DEFAULT_SLOT_MS, faucet: str | None = None,
               snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
               clock: Callable[[], float] = time.time,
               busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Ledger:
        """Create a ledger whose genesis gives `balances`. LedgerError if one exists."""
        genesis = Genesis(chain_id or _new_chain_id(), slot_ms, dict(balances), faucet)
        rules.genesis(genesis.balances)  # ValueError on balances the rules would not start from
        if slot_ms < 1:
            raise ValueError("slot_ms must be at least 1")
        created = _initialise(Path(path), lambda: genesis, snapshot_every, clock, busy_timeout)
        if not created:
            raise LedgerError(f"a ledger already exists at {path}")
        return cls.open(path, clock=clock, busy_timeout=busy_timeout)

    @classmethod
    def open_localnet(cls, ledger_dir: str | Path, *, supply: int = DEFAULT_LOCALNET_SUPPLY,
                      slot_ms: int = DEFAULT_SLOT_MS, chain_id: str | None = None,
                      snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
                      clock: Callable[[], float] = time.time,
                      busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Ledger:
        """Open `<ledger_dir>/ledger.sqlite`, creating it on first use as a LOCAL-ONLY
        network whose whole `supply` belongs to a faucet whose key is written next to it
        (`<ledger_dir>/faucet/node.key`, mode 0600): any process that can read the ledger dir
        can fund accounts with `fund()`. Safe when several processes call it at once: the
        first one creates the faucet key and the genesis under SQLite's write lock."""
        ledger_dir = Path(ledger_dir)
        ledger_dir.mkdir(parents=True, exist_ok=True)

        def genesis() -> Genesis:
            faucet = load_or_create_identity(ledger_dir / FAUCET_DIR_NAME)
            account = faucet.peer_id.to_base58()
            return Genesis(chain_id or _new_chain_id("tasknet-localnet"), slot_ms,
                           {account: supply}, account)

        path = ledger_dir / LEDGER_FILE_NAME
        _initialise(path, genesis, snapshot_every, clock, busy_timeout)
        return cls.open(path, clock=clock, busy_timeout=busy_timeout)

    def _load(self, use_snapshots: bool) -> None:
        """(Re)build the state: latest snapshot, then replay the tail; check the head."""
        try:
            with _read_transaction(self._db):
                self._load_checked(use_snapshots)
        except sqlite3.DatabaseError as exc:
            at = self._replay.idx + 1 if self._replay is not None else 0
            self._replay = None
            raise _unreadable(self.path, at, exc) from None
        except BaseException:
            self._replay = None
            raise

    def _load_checked(self, use_snapshots: bool) -> None:
        self._replay = None
        db = self._db
        self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        self._looked_at = time.monotonic()
        genesis, genesis_row, self.snapshot_every = _read_genesis(db, self.path)
        start: _Replay | None = None
        if use_snapshots:
            start = self._from_snapshot(genesis)
        if start is None:
            start = _Replay(self.path, genesis, _genesis_state(self.path, genesis), 0,
                            genesis_row.hash, genesis_row.slot)
        self._replay = start
        first = start.idx
        for row in _rows(db.execute(f"{_ROW} WHERE idx > ? ORDER BY idx", (start.idx,))):
            start.apply(row)
        self.replayed = start.idx - first
        _check_head(db, start)

    def _from_snapshot(self, genesis: Genesis) -> _Replay | None:
        found = self._db.execute(
            "SELECT idx, entry_hash, digest, state FROM snapshots WHERE idx <= "
            "(SELECT idx FROM head) ORDER BY idx DESC LIMIT 1").fetchone()
        if found is None:
            return None
        idx, snap_hash, digest, blob = found
        where = f"ledger {self.path} is corrupt at entry {idx}"
        row = self._db.execute(f"{_ROW} WHERE idx = ?", (idx,)).fetchone()
        if row is None:
            raise LedgerCorrupt(f"{where}: missing (a snapshot was taken after it)")
        if _Row(*row).hash != snap_hash:
            raise LedgerCorrupt(f"{where}: differs from the entry its snapshot was taken after")
        if hashlib.sha256(blob).digest() != digest:
            raise LedgerCorrupt(f"{where}: the snapshot after it is damaged (digest differs)")
        try:
            state = ChainState.from_bytes(blob)
        except Exception as exc:
            raise LedgerCorrupt(f"{where}: the snapshot after it does not decode "
                                f"({_one_line(exc)})") from None
        return _Replay(self.path, genesis, state, idx, snap_hash, _Row(*row).slot)

    # -- reading ------------------------------------------------------------------------

    def _live(self) -> _Replay:
        if self._closed:
            raise LedgerError(f"ledger {self.path} is closed")
        if self._replay is None:  # dropped after a failed append: rebuild from the file
            self._load(True)
        assert self._replay is not None
        return self._replay

    @property
    def genesis(self) -> Genesis:
        return self._live().genesis

    @property
    def chain_id(self) -> str:
        return self._live().genesis.chain_id

    @property
    def slot_ms(self) -> int:
        return self._live().genesis.slot_ms

    @property
    def state(self) -> ChainState:
        """The state after the latest entry in the file (refreshes first)."""
        self.refresh()
        return self._live().state

    @property
    def height(self) -> int:
        """The index of the last entry this Ledger has applied (no refresh)."""
        return self._live().idx

    @property
    def head_slot(self) -> int:
        return self._live().slot

    def refresh(self) -> int:
        """Apply the entries other writers appended since; returns the height. Costs one
        `PRAGMA data_version` when nothing changed."""
        replay = self._live()
        self._looked_at = time.monotonic()
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            unchecked: list[_Row] = []
            try:
                self._catch_up(replay, unchecked)
            finally:
                self._check_signatures(replay, unchecked, background=False)
            # only now: a catch-up cut short (the file busy) is taken up again next time
            self._data_version = version
        return replay.idx

    def _catch_up(self, replay: _Replay, unchecked: list[_Row] | None = None,
                  db: sqlite3.Connection | None = None) -> None:
        """Apply the entries after the replay's (read through `db`, the reading connection
        by default). Given `unchecked`, their signatures are left for the caller to check:
        every entry applied is added to it as it is, so that the caller sees them even when a
        later entry fails the catch-up."""
        self._looked_at = time.monotonic()
        try:
            for row in _rows((db or self._db).execute(f"{_ROW} WHERE idx > ? ORDER BY idx",
                                                      (replay.idx,))):
                replay.apply(row, check_signature=unchecked is None)
                if unchecked is not None:
                    unchecked.append(row)
        except sqlite3.DatabaseError as exc:
            raise _unreadable(self.path, replay.idx + 1, exc) from None

    def wall_slot(self) -> int:
        return int(self.clock() * 1000) // self.slot_ms

    def now(self) -> int:
        """The slot an append made now would get."""
        return max(self.head_slot, self.wall_slot())

    def next_nonce(self, account: str) -> int:
        """The nonce the account's next transaction must carry (refreshes first)."""
        return self.state.nonces.get(account, 0)

    def entries(self, start: int = 1) -> Iterator[Entry]:
        """The entries from index `start` on (genesis excluded), decoded, as stored."""
        for row in _rows(self._db.execute(f"{_ROW} WHERE idx >= ? AND idx > 0 ORDER BY idx",
                                          (start,))):
            yield Entry(row.idx, row.slot, account_of(row.pubkey), int(row.nonce or 0),
                        decode(row.tx), row.hash)

    # -- appending ----------------------------------------------------------------------

    def append(self, identity: Identity, tx: Mapping[str, Any]) -> Receipt:
        """Apply `tx` signed by `identity` and append it: the rules see the state after every
        entry in the file (whoever wrote them), under SQLite's write lock. Without a "nonce"
        the sender's next one is filled in. Raises Refused (nothing appended), LedgerBusy
        (lock not obtained in time; nothing appended) or ChainUnavailable."""
        if not isinstance(tx, Mapping):
            raise Refused("malformed", "a transaction is a map")
        pubkey = identity.public_key
        sender = account_of(pubkey)
        replay = self._live()
        # The entries other writers append are replayed as they come (before the lock, while
        # waiting for it, and what slipped in under it) without their signatures, the costly
        # part (about 40 us an entry); all of them are checked after the lock is released, in
        # the finally below, so that a writer holds the lock for little more than its own
        # entry. A bad one then fails this append as corrupt (as opening the file would),
        # with this entry committed after it: the file is refused from that entry on,
        # whatever follows it. The state is never trusted over an unchecked entry: every
        # way out of append passes that check.
        unchecked: list[_Row] = []
        applied = committed = False
        writer = self._writer_connection()
        try:
            # encoded and signed before the lock, with the nonce the sender had at this
            # Ledger's last look (its own appends move it): inside the lock, only when
            # another writer of the same sender used that nonce meanwhile. No look at the
            # file first: what others appended is replayed under the lock (and while waiting
            # for it), and a lone writer's look would only find its own last entry; unless
            # this Ledger has not looked for STALE_LOOK_S (its backlog is replayed now).
            if time.monotonic() - self._looked_at >= STALE_LOOK_S:
                self._catch_up(replay, unchecked)
            signed = self._sign(identity, sender, tx, replay)
            self._begin_immediate(while_waiting=lambda: self._catch_up(replay, unchecked))
            try:
                self._catch_up(replay, unchecked, writer)
                if "nonce" not in tx and signed.nonce != replay.state.nonces.get(sender, 0):
                    signed = self._sign(identity, sender, tx, replay)
                slot = max(replay.slot, self.wall_slot())
                result = rules.apply(replay.state, sender, signed.decoded, slot)
                applied = True
                idx, prev = replay.idx + 1, replay.hash
                new_hash = entry_hash(idx, prev, slot, signed.tx, pubkey, signed.sig)
                writer.execute(
                    "INSERT INTO entries (idx, prev, slot, tx, pubkey, sig, sender, nonce) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (idx, prev, slot, signed.tx, pubkey, signed.sig, sender, signed.nonce))
                writer.execute("UPDATE head SET idx = ?, hash = ? WHERE id = 0",
                               (idx, new_hash))
                if idx % self.snapshot_every == 0:
                    # a snapshot is trusted when the file is opened: only over checked entries
                    replay.check_signatures(unchecked)
                    unchecked.clear()
                    blob = replay.state.to_bytes()
                    writer.execute(
                        "INSERT INTO snapshots (idx, entry_hash, digest, state) "
                        "VALUES (?, ?, ?, ?)", (idx, new_hash, hashlib.sha256(blob).digest(), blob))
                writer.execute("COMMIT")
                committed = True
            except sqlite3.Error as exc:
                raise ChainUnavailable(f"ledger {self.path}: append failed"
                                       f"{'' if applied else ' (nothing appended)'}: "
                                       f"{_one_line(exc)}") from None
            finally:
                if not committed:
                    _rollback(writer)
                    if applied:  # the in-memory state ran ahead of the file: rebuild it
                        self._replay = None
        finally:
            self._check_signatures(replay, unchecked)
        replay.idx, replay.hash, replay.slot = idx, new_hash, slot
        return Receipt(idx, slot, tx_hash(pubkey, signed.message), result)

    def _sign(self, identity: Identity, sender: str, tx: Mapping[str, Any],
              replay: _Replay) -> _Signed:
        """`tx` encoded canonically (with the sender's next nonce when it has none) and
        signed; Refused when it cannot be encoded."""
        body = dict(tx)
        if "nonce" not in body:
            body["nonce"] = replay.state.nonces.get(sender, 0)
        try:
            tx_bytes = encode(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise Refused("malformed", f"cannot encode the transaction: {exc}") from None
        decoded = decode(tx_bytes)  # what replays will see, exactly
        nonce = decoded["nonce"]
        message = signing_bytes(replay.genesis.chain_id, nonce, tx_bytes)
        return _Signed(tx_bytes, decoded, nonce, message, identity.sign(message))

    def _check_signatures(self, replay: _Replay, rows: list[_Row], *,
                          background: bool = True) -> None:
        """Check the signatures of `rows`, entries `replay` applied without them; given
        `background`, a batch of BACKGROUND_CHECK_FROM or more on the checking thread (see
        BACKGROUND_CHECK_NICE), waiting for it, or inline if that thread cannot be had. A bad
        one raises LedgerCorrupt and drops the state built on it (so does anything else that
        stops the check: the state is never trusted over an unchecked entry)."""
        try:
            job = None
            if background and len(rows) >= BACKGROUND_CHECK_FROM:
                job = self._check_in_background(replay, rows)
            if job is not None:
                job.result()
            else:
                replay.check_signatures(rows)
        except BaseException:  # a forged entry, or checks cut short: the state is not used
            self._replay = None
            raise

    def _check_in_background(self, replay: _Replay, rows: list[_Row]) -> Future[None] | None:
        """`rows`' check handed to the checking thread (started at the first one), or None
        when there is none to be had: not Linux, this Ledger closed, no thread can start."""
        if sys.platform != "linux" or self._closed or self._background_broken:
            return None
        try:
            if self._background is None:
                self._background = ThreadPoolExecutor(
                    1, thread_name_prefix="ledger-signatures",
                    initializer=_lower_this_threads_priority)
            return self._background.submit(replay.check_signatures, rows)
        except RuntimeError as exc:  # no thread (a limit), or a broken pool: check inline
            log.warning("ledger %s: signatures checked inline from now on (%s)", self.path,
                        _one_line(exc))
            self._background_broken = True
            pool, self._background = self._background, None
            if pool is not None:
                pool.shutdown(wait=False)
            return None

    def _writer_connection(self) -> sqlite3.Connection:
        """The connection appends take the write lock and write through: SQLite's busy
        handler off (busy_timeout 0: `_begin_immediate` waits its own way), so that taking
        the lock costs no PRAGMA to switch it off and on again each time. Reads (and the
        replay while waiting for the lock) go through the reading connection, whose busy
        handler waits out another connection's WAL recovery as usual. Opened at the first
        append, by path: LedgerError if the file there is another ledger by then."""
        if self._writer is None:
            self._live()  # not closed
            # opened by path, later than the reading connection: still the same file?
            replaced = LedgerError(f"ledger {self.path}: the file was replaced or removed "
                                   "since it was opened: open it again")
            try:
                same_file = _file_id(self.path) == self._file_id
            except OSError:
                same_file = False
            if not same_file:
                raise replaced
            writer: sqlite3.Connection | None = None
            try:
                writer = _connect(self.path, "rw", self._busy_timeout)
                # inode numbers are reused: a new file there could have the old one's
                genesis = f"{_ROW} WHERE idx = 0"
                if writer.execute(genesis).fetchone() != self._db.execute(genesis).fetchone():
                    raise replaced
                writer.execute("PRAGMA busy_timeout = 0")
            except BaseException as exc:
                if writer is not None:
                    writer.close()
                if isinstance(exc, sqlite3.Error):
                    raise ChainUnavailable(f"ledger {self.path}: {_one_line(exc)}") from None
                raise
            self._writer = writer
        return self._writer

    def _begin_immediate(self, while_waiting: Callable[[], None] | None = None) -> None:
        """Take SQLite's write lock on the writer connection: BEGIN IMMEDIATE, tried again
        after the pauses of LOCK_PAUSES_S (jittered), then every LOCK_KNOCK_S, until the
        busy timeout (LedgerBusy); `while_waiting` runs between tries (append replays what
        the holder committed, so that less is left to replay once the lock is this one's)."""
        started = time.monotonic()
        deadline = started + self._busy_timeout
        writer = self._writer_connection()
        for attempt in itertools.count():
            try:
                writer.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise ChainUnavailable(f"ledger {self.path}: {_one_line(exc)}") from None
                if time.monotonic() >= deadline:
                    raise LedgerBusy(f"ledger {self.path}: write lock not obtained in "
                                     f"{self._busy_timeout:g}s") from None
            if time.monotonic() - started >= LOCK_KNOCK_AFTER_S:
                pause = LOCK_KNOCK_S
            else:
                pause = LOCK_PAUSES_S[min(attempt, len(LOCK_PAUSES_S) - 1)]
            time.sleep(pause * (0.5 + random.random()))
            if while_waiting is not None:
                while_waiting()

    # -- localnet faucet ----------------------------------------------------------------

    def faucet_identity(self) -> Identity:
        """The localnet faucet's key (LOCAL ONLY: see open_localnet)."""
        faucet = self.genesis.faucet
        key_dir = self.path.parent / FAUCET_DIR_NAME
        if faucet is None or not (key_dir / KEY_FILE_NAME).is_file():
            raise LedgerError(f"ledger {self.path} has no local faucet")
        identity = load_or_create_identity(key_dir)
        if identity.peer_id.to_base58() != faucet:
            raise LedgerError(f"{key_dir / KEY_FILE_NAME} is not this ledger's faucet key")
        return identity

    def fund(self, account: str, amount: int) -> Receipt:
        """Transfer `amount` from the localnet faucet to `account`."""
        return self.append(self.faucet_identity(), {"op": "transfer", "to": account,
                                                    "amount": amount})

    # -- verification -------------------------------------------------------------------

    def verify(self) -> int:
        """Check the whole file from genesis: links, signatures, slots, the rules on every
        entry, every snapshot and the head record. Returns the number of entries (genesis
        included). Raises LedgerCorrupt naming the first bad entry."""
        self._live()
        try:
            with _read_transaction(self._db):
                return self._verify()
        except sqlite3.DatabaseError as exc:
            raise LedgerCorrupt(f"ledger {self.path} is corrupt: unreadable "
                                f"({_one_line(exc)})") from None

    def _verify(self) -> int:
        genesis, genesis_row, _ = _read_genesis(self._db, self.path)
        replay = _Replay(self.path, genesis, _genesis_state(self.path, genesis), 0,
                         genesis_row.hash, genesis_row.slot)
        snapshots = {idx: (h, blob) for idx, h, blob in self._db.execute(
            "SELECT idx, entry_hash, state FROM snapshots")}
        for row in _rows(self._db.execute(f"{_ROW} WHERE idx > 0 ORDER BY idx")):
            replay.apply(row)
            if row.idx in snapshots:
                snap_hash, blob = snapshots.pop(row.idx)
                if snap_hash != replay.hash or blob != replay.state.to_bytes():
                    raise replay.corrupt(row.idx, "the snapshot after it differs from "
                                                  "the replayed state")
        _check_head(self._db, replay)
        if snapshots:
            raise replay.corrupt(min(snapshots), "a snapshot exists for this missing entry")
        return replay.idx + 1

    @staticmethod
    def verify_file(path: str | Path) -> int:
        """Open the ledger at `path` and verify all of it (see `verify`)."""
        with Ledger.open(path) as ledger:
            return ledger.verify()

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()
            if self._writer is not None:
                self._writer.close()
            if self._background is not None:
                self._background.shutdown()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _new_chain_id(prefix: str = "tasknet-ledger") -> str:
    return f"{prefix}-{random.getrandbits(64):016x}"


def _file_id(path: Path) -> tuple[int, int]:
    """The file at `path` (device, inode): another file put in its place differs."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _lower_this_threads_priority() -> None:
    """Raise the calling thread's nice value by BACKGROUND_CHECK_NICE (Linux: a thread's own;
    raising it needs no privilege). Left as it is if the system refuses."""
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness + BACKGROUND_CHECK_NICE))
    except Exception as exc:  # never fail the thread, only its priority
        log.debug("ledger: signatures checked at normal priority (%s)", exc)


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # no transaction was open (SQLite rolled it back itself)


@contextmanager
def _read_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One consistent view of the file (WAL: a read snapshot) for several statements."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        _rollback(db)


def _connect(path: Path, mode: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL.
    A file another connection keeps busy (turning it to WAL, recovering its WAL) is tried
    again until `busy_timeout`: processes that open one new ledger at once all get it."""

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None,
                             check_same_thread=False,
                             timeout=min(busy_timeout, SQLITE_BUSY_WAIT_S))
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute("PRAGMA synchronous=FULL")
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            if _is_busy(exc):
                raise LedgerBusy(f"ledger {path}: {_one_line(exc)}") from None
            what = ("not a tasknet ledger file" if "not a database" in str(exc)
                    else "the file is damaged")
            raise LedgerCorrupt(f"ledger {path} is corrupt at entry 0: {what} "
                                f"({_one_line(exc)})") from None

    return _while_busy(busy_timeout, connect)


def _while_busy(busy_timeout: float, attempt: Callable[[], _T]) -> _T:
    """`attempt()`, tried again after short pauses while it raises LedgerBusy (another
    connection keeps the file a moment), until `busy_timeout` has passed."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return attempt()
        except LedgerBusy:
            if time.monotonic() >= deadline:
                raise
        time.sleep(OPEN_BUSY_PAUSE_S * (1 + random.random()))


def _unreadable(path: Path, at: int, exc: sqlite3.DatabaseError) -> LedgerBusy | LedgerCorrupt:
    """What a failed read of the file means: busy (another connection keeps it a moment,
    a WAL recovery, say: not damage) or corrupt from entry `at` on."""
    if _is_busy(exc):
        return LedgerBusy(f"ledger {path}: {_one_line(exc)}")
    return LedgerCorrupt(f"ledger {path} is corrupt at entry {at}: unreadable "
                         f"({_one_line(exc)})")


def _initialise(path: Path, make_genesis: Callable[[], Genesis], snapshot_every: int,
                clock: Callable[[], float], busy_timeout: float) -> bool:
    """Create the tables and the genesis entry unless a genesis is there. True if created."""
    if snapshot_every < 1:
        raise ValueError("snapshot_every must be at least 1")
    db = _connect(path, "rwc", busy_timeout)
    try:
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("SELECT 1 FROM entries WHERE idx = 0").fetchone() is not None:
                db.execute("ROLLBACK")
                return False
            genesis = make_genesis()
            doc = encode(genesis.to_doc())
            slot = int(clock() * 1000) // genesis.slot_ms
            row = _Row(0, ZERO_HASH, slot, doc, b"", b"", None, None)
            db.execute("INSERT INTO entries (idx, prev, slot, tx, pubkey, sig) "
                       "VALUES (0, ?, ?, ?, x'', x'')", (ZERO_HASH, slot, doc))
            db.execute("INSERT INTO head (id, idx, hash) VALUES (0, 0, ?)", (row.hash,))
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [("format", FORMAT), ("snapshot_every", snapshot_every)])
            db.execute("COMMIT")
            return True
        except BaseException:
            _rollback(db)
            raise
    finally:
        db.close()


def _read_genesis(db: sqlite3.Connection, path: Path) -> tuple[Genesis, _Row, int]:
    where = f"ledger {path} is corrupt at entry 0"
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        found = db.execute(f"{_ROW} WHERE idx = 0").fetchone()
    except sqlite3.OperationalError as exc:
        raise LedgerCorrupt(f"{where}: not a tasknet ledger ({_one_line(exc)})") from None
    found_format = meta.get("format")
    if isinstance(found_format, str) and found_format.startswith("tasknet-ledger-") \
            and found_format != FORMAT:
        raise LedgerCorrupt(f"ledger {path} is a {found_format} file, written by another "
                            f"version of tasknet with other settlement rules; this one reads "
                            f"{FORMAT}: move it away to start a new local chain")
    if found_format != FORMAT:
        raise LedgerCorrupt(f"{where}: not a {FORMAT} file (format {found_format!r})")
    every = meta.get("snapshot_every")
    if not isinstance(every, int) or every < 1:
        raise LedgerCorrupt(f"{where}: bad snapshot_every in meta")
    if found is None:
        raise LedgerCorrupt(f"{where}: missing")
    row = _Row(*found)
    if row.prev != ZERO_HASH or row.pubkey or row.sig:
        raise LedgerCorrupt(f"{where}: not a genesis entry")
    try:
        genesis = Genesis.from_doc(decode(row.tx))
    except Exception as exc:
        raise LedgerCorrupt(f"{where}: bad genesis document ({_one_line(exc)})") from None
    return genesis, row, every


def _genesis_state(path: Path, genesis: Genesis) -> ChainState:
    try:
        return rules.genesis(genesis.balances)
    except ValueError as exc:
        raise LedgerCorrupt(f"ledger {path} is corrupt at entry 0: the rules refuse its "
                            f"genesis balances ({_one_line(exc)})") from None


def _check_head(db: sqlite3.Connection, replay: _Replay) -> None:
    head = db.execute("SELECT idx, hash FROM head WHERE id = 0").fetchone()
    if head is None:
        raise replay.corrupt(replay.idx, "the head record is missing")
    idx, hash_ = head
    if idx > replay.idx:
        raise replay.corrupt(replay.idx + 1, f"missing (the ledger ends at entry {replay.idx}, "
                                             f"its head record at entry {idx}: truncated)")
    if idx < replay.idx or hash_ != replay.hash:
        raise replay.corrupt(replay.idx, "differs from the head record")


# --- the adapter ---------------------------------------------------------------------------

class LedgerAdapter(ChainAdapter):
    """The embedded ledger behind the chain adapter interface. Every SQLite call runs in a
    trio worker thread, one at a time per adapter (CapacityLimiter(1)). Open it with
    `await LedgerAdapter.open(path, identity)`."""

    def __init__(self, ledger: Ledger, identity: Identity, *,
                 poll_interval: float = 0.02) -> None:
        self.ledger = ledger
        self.identity = identity
        self.account = identity.peer_id.to_base58()
        self.slot_ms = ledger.slot_ms
        self.leaf_format = LEDGER_LEAVES
        self.chain_id = ledger.chain_id
        self.poll_interval = poll_interval
        self._limiter = trio.CapacityLimiter(1)
        self._head_slot = ledger.head_slot
        self._clock = ledger.clock

    @classmethod
    async def open(cls, path: str | Path, identity: Identity, *, poll_interval: float = 0.02,
                   clock: Callable[[], float] = time.time,
                   busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> LedgerAdapter:
        ledger = await trio.to_thread.run_sync(
            lambda: Ledger.open(path, clock=clock, busy_timeout=busy_timeout),
            limiter=trio.CapacityLimiter(1))
        return cls(ledger, identity, poll_interval=poll_interval)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def now(self) -> int:
        # Every entry's slot is at most the wall clock's when it was written: no file access.
        return max(self._head_slot, int(self._clock() * 1000) // self.slot_ms)

    async def send(self, tx: dict[str, Any]) -> Receipt:
        receipt: Receipt = await self._run(lambda: self.ledger.append(self.identity, tx))
        self._head_slot = max(self._head_slot, receipt.slot)
        return receipt

    def describe(self) -> dict[str, Any]:
        return {"kind": "ledger", "path": str(self.ledger.path), "chain_id": self.chain_id}

    async def fund_from_faucet(self, amount: int) -> Receipt:
        """LOCAL ONLY: take `amount` from the localnet faucet (see `Ledger.open_localnet`)
        into this adapter's account. Raises LedgerError on a ledger without a faucet."""
        receipt: Receipt = await self._run(lambda: self.ledger.fund(self.account, amount))
        self._head_slot = max(self._head_slot, receipt.slot)
        return receipt

    def _read(self, view: Callable[[ChainState, int], Any]) -> Callable[[], Any]:
        def read() -> Any:
            state = self.ledger.state
            self._head_slot = self.ledger.head_slot
            return view(state, self.ledger.now())
        return read

    async def task(self, task_id: str) -> dict[str, Any] | None:
        def view(state: ChainState, slot: int) -> dict[str, Any] | None:
            if task_id not in state.tasks:
                return None
            return rules.task_view(state, task_id, slot)
        result: dict[str, Any] | None = await self._run(self._read(view))
        return result

    async def tasks(self) -> list[dict[str, Any]]:
        def view(state: ChainState, slot: int) -> list[dict[str, Any]]:
            return [rules.task_view(state, task_id, slot) for task_id in sorted(state.tasks)]
        result: list[dict[str, Any]] = await self._run(self._read(view))
        return result

    async def balance(self, account: str) -> int:
        result: int = await self._run(
            self._read(lambda state, _slot: state.balances.get(account, 0)))
        return result

    async def round_view(self, task_id: str, r: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(
            self._read(lambda state, slot: rules.round_view(state, task_id, r, slot)))
        return result

    async def height(self) -> int:
        height: int = await self._run(self.ledger.refresh)
        self._head_slot = self.ledger.head_slot
        return height

    async def wait_for_change(self, after_height: int, timeout: float) -> int:
        deadline = trio.current_time() + timeout
        while True:
            height = await self.height()
            if height != after_height or trio.current_time() >= deadline:
                return height
            await trio.sleep(min(self.poll_interval,
                                 max(0.0, deadline - trio.current_time())))

    async def close(self) -> None:
        await self._run(self.ledger.close)


__all__ = [
    "DEFAULT_SLOT_MS", "FAUCET_DIR_NAME", "LEDGER_FILE_NAME", "Entry", "Genesis", "Ledger",
    "LedgerAdapter", "LedgerBusy", "LedgerCorrupt", "LedgerError", "account_of", "decode",
    "encode",
]
