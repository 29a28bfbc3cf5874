# The embedded ledger (chain/ledger.py) on real files: appending and reopening, refusals that
# leave no entry, tampered / cut / garbage files refused with one line naming the entry,
# snapshots, five real processes appending at once while one is SIGKILLed, the localnet
# faucet, and LedgerAdapter under trio.
from __future__ import annotations

import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import chain.ledger
from chain.ledger import (
    BACKGROUND_CHECK_FROM,
    LEDGER_FILE_NAME,
    Ledger,
    LedgerAdapter,
    LedgerBusy,
    LedgerCorrupt,
    LedgerError,
    account_of,
)
from chain.rules import Refused
from p2p.identity import Identity

ROOT = Path(__file__).resolve().parent.parent
SUPPLY = 10**9


def _ids(n: int) -> list[Identity]:
    return [Identity.generate() for _ in range(n)]


def _acct(identity: Identity) -> str:
    return account_of(identity.public_key)


def _transfer(to: Identity | str, amount: int = 1) -> dict[str, object]:
    return {"op": "transfer", "to": to if isinstance(to, str) else _acct(to), "amount": amount}


def _ledger(path: Path, ids: list[Identity], **kw: Any) -> Ledger:
    return Ledger.create(path, balances={_acct(i): SUPPLY for i in ids}, **kw)


def _ten_entries(path: Path) -> None:
    a, b = _ids(2)
    with _ledger(path, [a, b]) as ledger:
        for _ in range(10):
            ledger.append(a, _transfer(b))


def _refused_at(path: Path, entry: int) -> str:
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(path).close()
    message = str(info.value)
    assert "\n" not in message and f"at entry {entry}:" in message, message
    return message


def _sql(path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(statement, args)
        db.commit()
    finally:
        db.close()


def _flip(path: Path, column: str, idx: int) -> None:
    db = sqlite3.connect(path)
    try:
        (value,) = db.execute(f"SELECT {column} FROM entries WHERE idx = ?", (idx,)).fetchone()
        damaged = value[:-1] + bytes([value[-1] ^ 0x01])  # the last byte: still decodes
        db.execute(f"UPDATE entries SET {column} = ? WHERE idx = ?", (damaged, idx))
        db.commit()
    finally:
        db.close()


def test_append_and_reopen_give_the_same_state(tmp_path: Path) -> None:
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    with _ledger(path, [a, b]) as ledger:
        receipts = [ledger.append(a, _transfer(b, 5)) for _ in range(20)]
        receipts.append(ledger.append(b, _transfer(a, 7)))
        state = ledger.state.to_bytes()
        chain_id = ledger.chain_id
    assert [r.height for r in receipts] == list(range(1, 22))
    assert receipts[0].result == {"ok": True, "op": "transfer", "amount": 5}
    assert all(x.slot <= y.slot for x, y in zip(receipts, receipts[1:], strict=False))
    assert len({r.tx_hash for r in receipts}) == 21
    with Ledger.open(path) as again:
        assert again.state.to_bytes() == state
        assert again.chain_id == chain_id and again.height == 21
        assert again.state.balances[_acct(a)] == SUPPLY - 100 + 7
        assert again.next_nonce(_acct(a)) == 20 and again.next_nonce(_acct(b)) == 1
        assert [(e.sender, e.nonce) for e in again.entries()][-1] == (_acct(b), 0)
        assert again.verify() == 22
    assert Ledger.verify_file(path) == 22


def test_refused_transactions_leave_no_entry(tmp_path: Path) -> None:
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    with _ledger(path, [a, b]) as ledger:
        first = ledger.append(a, {**_transfer(b), "nonce": 0})
        with pytest.raises(Refused) as replayed:  # the same transaction again: same nonce
            ledger.append(a, {**_transfer(b), "nonce": 0})
        assert replayed.value.reason == "bad_nonce"
        with pytest.raises(Refused) as gap:
            ledger.append(a, {**_transfer(b), "nonce": 5})
        assert gap.value.reason == "bad_nonce"
        with pytest.raises(Refused) as poor:
            ledger.append(a, _transfer(b, SUPPLY * 3))
        assert poor.value.reason == "insufficient_balance"
        with pytest.raises(Refused) as bad:
            ledger.append(a, {"op": "no_such_op"})
        assert bad.value.reason == "malformed"
        with pytest.raises(Refused) as unencodable:
            ledger.append(a, {"op": "transfer", "to": _acct(b), "amount": 1, "x": object()})
        assert unencodable.value.reason == "malformed"
        assert ledger.height == 1
        second = ledger.append(a, _transfer(b))  # nonce 1: the refusals consumed nothing
        assert second.height == 2
    with Ledger.open(path) as again:
        assert [(e.idx, e.nonce) for e in again.entries()] == [(1, 0), (2, 1)]
        assert again.state.nonces[_acct(a)] == 2
    assert first.height == 1


def test_two_ledgers_of_one_sender_take_the_next_nonce_each(tmp_path: Path) -> None:
    # a Ledger signs with the nonce its sender had at its last look, without looking at the
    # file first: one that another Ledger of the same sender overtook signs again under the
    # lock, with the nonce the file has then, and is not refused
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    _ledger(path, [a, b]).close()
    with Ledger.open(path) as first, Ledger.open(path) as second:
        assert first.append(a, _transfer(b)).height == 1
        assert first.append(a, _transfer(b)).height == 2
        behind = second.append(a, _transfer(b, 3))  # its last look: nonce 0
        assert behind.height == 3
        assert [(e.nonce, e.tx["amount"]) for e in second.entries()] == [(0, 1), (1, 1), (2, 3)]
        with pytest.raises(Refused) as explicit:  # a nonce the caller chose is not changed
            first.append(a, {**_transfer(b), "nonce": 2})
        assert explicit.value.reason == "bad_nonce"
    assert Ledger.verify_file(path) == 4


def test_a_tampered_transaction_is_refused_naming_its_entry(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    _ten_entries(path)
    _flip(path, "tx", 4)
    assert "signature" in _refused_at(path, 4)


def test_a_tampered_signature_is_refused_naming_its_entry(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    _ten_entries(path)
    _flip(path, "sig", 10)  # the last entry: no successor links to it, its signature fails
    assert "bad signature" in _refused_at(path, 10)


@pytest.mark.parametrize("broken_after", [False, True])
def test_an_entry_forged_while_a_writer_takes_the_lock_fails_its_append(
        tmp_path: Path, broken_after: bool) -> None:
    # entries that slip in between an append's catch-up and its lock are replayed under the
    # lock without their signatures, checked right after: a forged one still fails the append
    # (its own entry lands after it) and the file is refused from the forged entry on. With
    # a broken entry after it (the catch-up stops there), the forged one is still named, and
    # the state built on it dropped
    path = tmp_path / LEDGER_FILE_NAME
    a, b = _ids(2)
    _ledger(path, [a, b]).close()
    with Ledger.open(path) as writer, Ledger.open(path) as other:
        writer.append(a, _transfer(b))
        take_lock = writer._begin_immediate

        def forge_then_take_lock(while_waiting: Callable[[], None] | None = None) -> None:
            forged = other.append(b, _transfer(a, 5))
            if broken_after:
                other.append(b, _transfer(a, 5))
                _flip(path, "prev", forged.height + 1)
            _flip(path, "sig", forged.height)
            take_lock(while_waiting)

        writer._begin_immediate = forge_then_take_lock  # type: ignore[method-assign]
        with pytest.raises(LedgerCorrupt, match="at entry 2: bad signature"):
            writer.append(a, _transfer(b))
        writer._begin_immediate = take_lock  # type: ignore[method-assign]
        with pytest.raises(LedgerCorrupt, match="at entry 2:"):
            writer.append(a, _transfer(b))  # the state built on it is never used again
        with pytest.raises(LedgerCorrupt, match="at entry 2:"):
            writer.height  # noqa: B018
    assert "bad signature" in _refused_at(path, 2)


@contextmanager
def _one_behind(tmp_path: Path,
                backlog: int) -> Iterator[tuple[Ledger, Ledger, Identity, Identity]]:
    """Two Ledgers on one new file, (behind, other, a, b): `other` has appended `backlog`
    transfers from b to a that `behind` has not looked at yet."""
    path = tmp_path / LEDGER_FILE_NAME
    a, b = _ids(2)
    _ledger(path, [a, b]).close()
    with Ledger.open(path) as behind, Ledger.open(path) as other:
        for _ in range(backlog):
            other.append(b, _transfer(a))
        yield behind, other, a, b


@pytest.mark.parametrize("via", ["append", "refresh"])
@pytest.mark.parametrize("batch", [3, BACKGROUND_CHECK_FROM + 24])
def test_a_forged_entry_among_others_writers_fails_the_catch_up_naming_it(
        tmp_path: Path, via: str, batch: int) -> None:
    # the entries another writer appended since this Ledger's last look are checked in one
    # batch, an append's large one on a checking thread at a lower CPU priority: the forged
    # (last) one is named either way, the state built on it is never used again, and
    # closing the Ledger ends the thread
    threads_before = set(threading.enumerate())
    with _one_behind(tmp_path, batch) as (reader, _, a, b):
        _flip(reader.path, "sig", batch)
        with pytest.raises(LedgerCorrupt, match=f"at entry {batch}: bad signature"):
            if via == "append":
                reader.append(a, _transfer(b))
            else:
                reader.refresh()
        with pytest.raises(LedgerCorrupt, match=f"at entry {batch}:"):
            reader.height  # noqa: B018
        checking = [t for t in set(threading.enumerate()) - threads_before
                    if t.name.startswith("ledger-signatures")]
        in_background = via == "append" and batch >= BACKGROUND_CHECK_FROM
        assert len(checking) == (1 if in_background and sys.platform == "linux" else 0)
        for thread in checking:
            assert thread.native_id is not None
            assert (os.getpriority(os.PRIO_PROCESS, thread.native_id)
                    > os.getpriority(os.PRIO_PROCESS, 0))
    for thread in checking:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_without_a_checking_thread_an_append_checks_inline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no thread to be had (a limit on threads): the large batch is checked inline, a forged
    # entry named as ever, and an honest backlog does not fail the append it was committed by
    class NoThreads:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def submit(self, *args: object) -> None:
            raise RuntimeError("can't start new thread")

        def shutdown(self, wait: bool = True) -> None:
            pass

    monkeypatch.setattr(chain.ledger, "ThreadPoolExecutor", NoThreads)
    with _one_behind(tmp_path, BACKGROUND_CHECK_FROM + 4) as (reader, other, a, b):
        assert reader.append(a, _transfer(b)).height == BACKGROUND_CHECK_FROM + 5
        for _ in range(BACKGROUND_CHECK_FROM + 4):
            other.append(b, _transfer(a))
        _flip(reader.path, "sig", other.height)
        with pytest.raises(LedgerCorrupt, match=f"at entry {other.height}: bad signature"):
            reader.append(a, _transfer(b))


def test_a_refresh_cut_short_is_taken_up_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a refresh that stops partway (the file busy) must not mark the others' later entries
    # as seen: the next refresh replays them, even if nobody writes in between
    with _one_behind(tmp_path, 30) as (reader, _, _, b):
        apply = chain.ledger._Replay.apply
        failures = [6]

        def busy_once(replay: Any, row: Any, check_signature: bool = True) -> None:
            if row.idx in failures:
                failures.remove(row.idx)
                raise LedgerBusy("ledger: database is locked (injected)")
            apply(replay, row, check_signature)

        monkeypatch.setattr(chain.ledger._Replay, "apply", busy_once)
        with pytest.raises(LedgerBusy):
            reader.refresh()
        assert reader.refresh() == 30
        assert reader.state.nonces[_acct(b)] == 30


@pytest.mark.parametrize("stale", [True, False])
def test_a_ledger_that_has_not_looked_a_while_replays_before_taking_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stale: bool) -> None:
    # a writer that keeps appending has just looked and signs without a look; one whose
    # last look is older than STALE_LOOK_S replays the others' entries before the lock, so
    # that a long backlog is not replayed while holding it. Both still see every entry.
    monkeypatch.setattr(chain.ledger, "STALE_LOOK_S", 0.0 if stale else math.inf)
    with _one_behind(tmp_path, 30) as (writer, _, a, b):
        take_lock = writer._begin_immediate
        seen_at_lock: list[int] = []

        def begin(while_waiting: Callable[[], None] | None = None) -> None:
            seen_at_lock.append(writer._live().idx)
            take_lock(while_waiting)

        writer._begin_immediate = begin  # type: ignore[method-assign]
        receipt = writer.append(a, _transfer(b, 7))
        assert seen_at_lock == [30 if stale else 0]
        assert receipt.height == 31 and writer.height == 31
        assert writer.state.balances[_acct(b)] == SUPPLY - 30 + 7


@pytest.mark.parametrize("replacement", ["another ledger", "an older copy", "nothing"])
def test_an_append_to_a_file_replaced_since_opening_is_refused(
        tmp_path: Path, replacement: str) -> None:
    # appends write through a second connection, opened by path at the first append: if the
    # path holds another file by then (another ledger, a backup of this one put back) or
    # none, nothing is written anywhere
    path, other_path = tmp_path / "one" / LEDGER_FILE_NAME, tmp_path / "two" / LEDGER_FILE_NAME
    a, b = _ids(2)
    for p in (path, other_path):
        p.parent.mkdir()
    _ledger(path, [a, b]).close()
    if replacement == "an older copy":
        with Ledger.open(path) as ledger:
            ledger.append(a, _transfer(b))
        shutil.copyfile(path, other_path)
        with Ledger.open(path) as ledger:
            ledger.append(a, _transfer(b))
    else:
        _ledger(other_path, [a, b]).close()
    with Ledger.open(path) as ledger:
        if replacement == "nothing":
            path.unlink()
        else:
            os.replace(other_path, path)
        with pytest.raises(LedgerError, match="replaced or removed since it was opened"):
            ledger.append(a, _transfer(b))
    if replacement != "nothing":
        expected = 2 if replacement == "an older copy" else 1
        assert Ledger.verify_file(path) == expected  # nothing was added to it


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[Path, Identity, Identity, sqlite3.Connection]]:
    """A two-account ledger and a plain SQLite connection to it that takes its write lock
    when the test says so (BEGIN IMMEDIATE), as another writer would."""
    path = tmp_path / LEDGER_FILE_NAME
    a, b = _ids(2)
    _ledger(path, [a, b]).close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        yield path, a, b, holder
    finally:
        holder.close()


def test_an_entry_forged_while_a_writer_waits_for_the_lock_fails_its_append(
        lock_holder: tuple[Path, Identity, Identity, sqlite3.Connection]) -> None:
    # a writer that finds the lock taken replays what the holder commits while it waits,
    # without signatures: a forged entry committed then is still caught before the append
    # returns, and the file is refused from it on
    path, a, b, holder = lock_holder
    with Ledger.open(path) as writer, Ledger.open(path) as other:
        take_lock = writer._begin_immediate
        waits: list[int] = []
        forged_at: list[int] = []

        def begin(while_waiting: Callable[[], None] | None = None) -> None:
            assert while_waiting is not None

            def hand_over() -> None:
                waits.append(1)
                if holder.in_transaction:  # the holder commits a forged entry, lets go
                    holder.execute("COMMIT")
                    forged_at.append(other.append(b, _transfer(a, 5)).height)
                    _flip(path, "sig", forged_at[0])
                while_waiting()
            holder.execute("BEGIN IMMEDIATE")
            take_lock(while_waiting=hand_over)

        writer._begin_immediate = begin  # type: ignore[method-assign]
        with pytest.raises(LedgerCorrupt, match=r"at entry 1: bad signature"):
            writer.append(a, _transfer(b))
        assert forged_at == [1] and len(waits) >= 1
    assert "bad signature" in _refused_at(path, 1)


def test_a_writer_that_cannot_get_the_lock_gives_up_at_its_busy_timeout(
        lock_holder: tuple[Path, Identity, Identity, sqlite3.Connection]) -> None:
    path, a, b, holder = lock_holder
    with Ledger.open(path, busy_timeout=0.3) as writer:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(LedgerBusy, match="not obtained in 0.3s"):
            writer.append(a, _transfer(b))
        assert 0.3 <= time.monotonic() - started < 5
        holder.execute("ROLLBACK")
        # nothing appended, and the same Ledger appends once the lock is free
        assert writer.refresh() == 0
        assert writer.append(a, _transfer(b)).height == 1


def test_opening_waits_for_a_connection_that_keeps_the_file_a_while(tmp_path: Path) -> None:
    # longer than SQLite's own busy handler waits (1 s): opening tries again until its busy
    # timeout, as when another process recovers the WAL, instead of calling the file corrupt
    path = tmp_path / LEDGER_FILE_NAME
    a, b = _ids(2)
    _ledger(path, [a, b]).close()
    keeper = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    keeper.execute("PRAGMA locking_mode=EXCLUSIVE")
    keeper.execute("BEGIN EXCLUSIVE")
    keeper.execute("COMMIT")  # exclusive mode: the lock stays until the connection closes
    release = threading.Timer(1.5, keeper.close)
    started = time.monotonic()
    release.start()
    try:
        with Ledger.open(path) as ledger:
            assert ledger.height == 0 and time.monotonic() - started >= 1.4
            assert ledger.append(a, _transfer(b)).height == 1
    finally:
        release.cancel()
        release.join()
        keeper.close()


def test_a_changed_link_or_slot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    _ten_entries(path)
    _flip(path, "prev", 6)
    assert "does not link to entry 5" in _refused_at(path, 6)
    path2 = tmp_path / "other.sqlite"
    _ten_entries(path2)
    _sql(path2, "UPDATE entries SET slot = slot - 1000 WHERE idx = 3")
    _refused_at(path2, 3)


def test_a_deleted_middle_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    _ten_entries(path)
    _sql(path, "DELETE FROM entries WHERE idx = 5")
    assert "missing" in _refused_at(path, 5)


def test_cut_off_last_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    _ten_entries(path)
    _sql(path, "DELETE FROM entries WHERE idx >= 9")
    assert "truncated" in _refused_at(path, 9)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    a, b = _ids(2)
    with _ledger(path, [a, b]) as ledger:
        for _ in range(300):  # several pages of entries
            ledger.append(a, _transfer(b))
    assert not Path(f"{path}-wal").exists()  # checkpointed at close: the file is all of it
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerCorrupt) as info:
        Ledger.open(path).close()
    message = str(info.value)
    assert "\n" not in message and re.search(r"at entry \d+:", message), message


def test_a_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    path.write_bytes(b"this is not a ledger\n" * 500)
    assert "not a tasknet ledger" in _refused_at(path, 0)
    empty = tmp_path / "empty.sqlite"
    _sql(empty, "CREATE TABLE t (x)")
    _refused_at(empty, 0)
    with pytest.raises(LedgerError):
        Ledger.open(tmp_path / "absent.sqlite")
    assert not (tmp_path / "absent.sqlite").exists()


def test_snapshots_replay_only_the_tail(tmp_path: Path) -> None:
    a, b, c = _ids(3)
    path = tmp_path / LEDGER_FILE_NAME
    with _ledger(path, [a, b], snapshot_every=50) as ledger:
        for i in range(130):
            ledger.append([a, b][i % 2], _transfer(c, i + 1))
        state = ledger.state.to_bytes()
    db = sqlite3.connect(path)
    assert [i for (i,) in db.execute("SELECT idx FROM snapshots ORDER BY idx")] == [50, 100]
    db.close()
    with Ledger.open(path) as fast:
        assert fast.replayed == 30 and fast.height == 130
        assert fast.state.to_bytes() == state
    with Ledger.open(path, use_snapshots=False) as full:
        assert full.replayed == 130
        assert full.state.to_bytes() == state
        assert full.verify() == 131


def test_tampering_before_the_last_snapshot_is_found_by_verify(tmp_path: Path) -> None:
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    with _ledger(path, [a, b], snapshot_every=10) as ledger:
        for _ in range(25):
            ledger.append(a, _transfer(b))
    _flip(path, "sig", 7)
    with Ledger.open(path) as ledger:  # opening checks from the last snapshot (20) on
        with pytest.raises(LedgerCorrupt, match=r"at entry 7: bad signature"):
            ledger.verify()
    with pytest.raises(LedgerCorrupt, match=r"at entry 7:"):
        Ledger.verify_file(path)
    _flip(path, "sig", 7)  # repaired; now damage the snapshot after entry 20
    _sql(path, "UPDATE snapshots SET state = CAST(x'00' || state AS BLOB) WHERE idx = 20")
    assert "snapshot" in _refused_at(path, 20)


def test_localnet_faucet_funds_accounts(tmp_path: Path) -> None:
    node = Identity.generate()
    with Ledger.open_localnet(tmp_path / "chain", supply=1000, slot_ms=100) as first:
        faucet = first.genesis.faucet
        assert faucet is not None and first.state.balances == {faucet: 1000}
        assert (tmp_path / "chain" / "faucet" / "node.key").stat().st_mode & 0o077 == 0
        with Ledger.open_localnet(tmp_path / "chain") as second:  # the same network
            assert second.chain_id == first.chain_id and second.slot_ms == 100
            second.fund(_acct(node), 300)
        assert first.state.balances == {faucet: 700, _acct(node): 300}
        first.append(node, _transfer(faucet, 100))
        assert first.state.total_supply() == 1000
    plain = _ledger(tmp_path / "plain.sqlite", [node])
    with plain, pytest.raises(LedgerError, match="no local faucet"):
        plain.fund(_acct(node), 1)


LOCALNET = """
import sys
from chain.ledger import Ledger
with Ledger.open_localnet(sys.argv[1], supply=1000) as ledger:
    print(ledger.chain_id, ledger.genesis.faucet, ledger.faucet_identity().peer_id, flush=True)
"""


def test_processes_opening_one_new_localnet_at_once_agree(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", LOCALNET, str(tmp_path / "chain")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        outs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    lines = {out.strip() for out, _ in outs}
    assert len(lines) == 1
    chain_id, faucet, key_owner = lines.pop().split()
    assert faucet == key_owner and chain_id.startswith("tasknet-localnet-")
    assert Ledger.verify_file(tmp_path / "chain" / LEDGER_FILE_NAME) == 1


WORKER = """
import sys
from chain.ledger import Ledger
from nacl.signing import SigningKey
from p2p.identity import Identity
path, seed, to, count = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3], int(sys.argv[4])
me = Identity(SigningKey(seed))
with Ledger.open(path) as ledger:
    for nonce in range(count):
        receipt = ledger.append(me, {"op": "transfer", "to": to, "amount": 1, "nonce": nonce})
        print(nonce, receipt.height, flush=True)
"""


def test_five_processes_append_concurrently_one_killed(tmp_path: Path) -> None:
    per_process, kill_after = 300, 40
    ids, sink = _ids(5), Identity.generate()
    path = tmp_path / LEDGER_FILE_NAME
    with _ledger(path, ids, snapshot_every=100) as ledger:
        supply = ledger.state.total_supply()
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), bytes(i.signing_key).hex(), _acct(sink),
         str(per_process)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in ids]
    reported: dict[str, list[str]] = {}
    try:
        victim = procs[2]
        assert victim.stdout is not None
        lines = [victim.stdout.readline() for _ in range(kill_after)]
        assert all(lines), (lines, victim.stderr.read() if victim.stderr else "")
        victim.kill()  # SIGKILL, in the middle of its appends
        rest, _ = victim.communicate(timeout=30)
        reported[_acct(ids[2])] = lines + rest.splitlines()
        for identity, proc in zip(ids, procs, strict=True):
            if proc is victim:
                continue
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reported[_acct(identity)] = out.splitlines()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert victim.returncode == -9
    with Ledger.open(path) as ledger:
        count = ledger.verify()
        entries = list(ledger.entries())
        keys = Counter((e.sender, e.nonce) for e in entries)
        assert max(keys.values()) == 1  # no transaction twice
        for account, lines in reported.items():
            for line in filter(None, lines):
                nonce, height = map(int, line.split())
                entry = entries[height - 1]
                assert (entry.sender, entry.nonce) == (account, nonce)
        for identity in ids:
            if identity is not ids[2]:
                assert len(reported[_acct(identity)]) == per_process
                assert sum(1 for s, _ in keys if s == _acct(identity)) == per_process
        assert [e.idx for e in entries] == list(range(1, count))
        state = ledger.state
        assert state.total_supply() == supply
        assert state.balances[_acct(sink)] == len(entries)


# --- LedgerAdapter under trio ----------------------------------------------------------------

async def test_adapter_sends_reads_and_refuses(tmp_path: Path) -> None:
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    _ledger(path, [a], slot_ms=100).close()
    async with await LedgerAdapter.open(path, a) as chain:
        assert chain.account == _acct(a) and chain.slot_ms == 100
        receipt = await chain.send(_transfer(b, 10))
        assert receipt.height == 1 == await chain.height()
        assert receipt.slot <= await chain.now()
        assert await chain.balance(_acct(b)) == 10
        assert await chain.balance("nobody") == 0
        with pytest.raises(Refused) as info:
            await chain.send(_transfer(b, SUPPLY))
        assert info.value.reason == "insufficient_balance"
        assert await chain.task("t1") is None and await chain.tasks() == []
        created = await chain.send({
            "op": "create_task", "task_id": "t1", "name": "demo", "code_hash": bytes(32),
            "round_time": 30, "submission_window": 10, "audit_window": 10, "min_stake": 5,
            "bounty_per_round": 100})
        assert created.result["task_id"] == "t1" and created.height == 2
        task = await chain.task("t1")
        assert task is not None and task["owner"] == _acct(a)
        assert [t["task_id"] for t in await chain.tasks()] == ["t1"]
        view = await chain.round_view("t1", 0)
        assert view["round"] == 0 and view["submissions"] == {}
        with pytest.raises(Refused) as unknown:
            await chain.round_view("nope", 0)
        assert unknown.value.reason == "unknown_task"


async def test_adapter_wait_for_change_wakes_on_another_writer(tmp_path: Path) -> None:
    a, b = _ids(2)
    path = tmp_path / LEDGER_FILE_NAME
    _ledger(path, [a, b]).close()
    async with await LedgerAdapter.open(path, a) as mine, \
            await LedgerAdapter.open(path, b) as theirs:
        start = await mine.height()
        assert await mine.wait_for_change(start, timeout=0.05) == start  # nothing: times out
        woke: list[int] = []

        async def waiter() -> None:
            woke.append(await mine.wait_for_change(start, timeout=30))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                await theirs.send(_transfer(a, 3))
        assert woke == [start + 1]
        assert await mine.balance(_acct(a)) == SUPPLY + 3
