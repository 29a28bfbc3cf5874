# Tests of shard.store: batched merges, group commit, partitions, corruption, crash durability.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import plyvel
import pytest

import crdt
from shard.keyspace import Keyspace
from shard.merkle import HashTree
from shard.store import CLOSE_RECORD, CorruptRecord, Store, StoreError, StoreOpenError

ROOT = Path(__file__).resolve().parent.parent
KEYSPACE = Keyspace(partitions=16, segments=4, salt=b"store-tests")


def gc(value: int, actor: str = "w") -> bytes:
    """An encoded G-counter holding `value` for one actor (merging two keeps the larger)."""
    return crdt.encode(crdt.GCounter({actor: value}))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as opened:
        yield opened


def scan(store: Store) -> dict[bytes, bytes]:
    return {key: state for p in range(KEYSPACE.partitions) for key, state in store.iterate(p)}


def both(x: int, y: int) -> bytes:
    return crdt.encode(crdt.GCounter({"x": x, "y": y}))


def test_apply_deltas_merges_and_returns_new_states(store: Store) -> None:
    assert store.apply_deltas([(b"a", gc(5, "x")), (b"b", gc(2, "x"))]) == [gc(5, "x"),
                                                                          gc(2, "x")]
    merged = store.apply_deltas([(b"a", gc(3, "x")), (b"b", gc(9, "y")), (b"a", gc(7, "y")),
                                 (b"a", gc(6, "y"))])
    assert merged == [gc(5, "x"), both(2, 9), both(5, 7), both(5, 7)]
    assert store.get(b"a") == both(5, 7)
    assert crdt.decode(store.get(b"b") or b"").value() == 11
    assert store.get(b"missing") is None
    assert len(store) == 2


def test_put_state_replaces_without_merging(store: Store) -> None:
    store.apply_deltas([(b"a", gc(9))])
    store.put_state(b"a", gc(1))
    assert store.get(b"a") == gc(1)
    assert store.tree == HashTree.build(KEYSPACE, _stored_items(store))


class CountingDB:
    """Wraps a plyvel DB and records the sync flag of every write batch."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.batches: list[bool] = []

    def write_batch(self, *, sync: bool = False) -> Any:
        self.batches.append(sync)
        return self._db.write_batch(sync=sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_batch_is_one_synced_write(store: Store) -> None:
    counting = CountingDB(store._db)
    store._db = counting  # type: ignore[assignment]
    store.apply_deltas([(b"k%d" % i, gc(i + 1)) for i in range(500)])
    store.apply_deltas([(b"k%d" % i, gc(1000)) for i in range(0, 500, 2)], sync=True)
    store.apply_deltas([(b"k1", gc(2000))], sync=False)
    assert counting.batches == [True, True, False]
    store._db = counting._db


def test_a_failed_batch_writes_nothing(store: Store) -> None:
    store.apply_deltas([(b"a", gc(1))])
    tree_before = HashTree.build(KEYSPACE, _stored_items(store))
    with pytest.raises(CorruptRecord) as caught:
        store.apply_deltas([(b"a", gc(5)), (b"b", gc(5)), (b"bad", b"short"), (b"c", gc(5))])
    assert caught.value.key == b"bad"
    assert caught.value.where == "delta"
    assert scan(store) == {b"a": gc(1)}
    assert store.tree == tree_before


def test_corrupt_stored_record_names_its_key(store: Store) -> None:
    store.put_state(b"victim", b"\xffnot a counter")
    store.apply_deltas([(b"fine", gc(1))])
    with pytest.raises(CorruptRecord) as caught:
        store.apply_deltas([(b"fine", gc(2)), (b"victim", gc(3))])
    assert caught.value.key == b"victim"
    assert caught.value.where == "stored state"
    assert isinstance(caught.value.cause, crdt.DecodeError)
    assert b"victim" in str(caught.value).encode()
    # The store keeps working for every other key.
    assert store.apply_deltas([(b"fine", gc(4))]) == [gc(4)]
    assert store.get(b"victim") == b"\xffnot a counter"


def test_iterate_count_and_drop_one_partition(store: Store) -> None:
    keys = [b"key-%d" % i for i in range(400)]
    store.apply_deltas([(k, gc(i + 1)) for i, k in enumerate(keys)])
    by_partition: dict[int, set[bytes]] = {}
    for k in keys:
        by_partition.setdefault(KEYSPACE.partition_of(k), set()).add(k)
    assert len(by_partition) == KEYSPACE.partitions
    for partition, expected in by_partition.items():
        assert {k for k, _ in store.iterate(partition)} == expected
        assert store.count(partition) == len(expected)
    victim = KEYSPACE.partition_of(keys[0])
    assert store.drop_partition(victim) == len(by_partition[victim])
    assert list(store.iterate(victim)) == []
    assert store.count(victim) == 0
    assert store.get(keys[0]) is None
    survivors = {k for p, ks in by_partition.items() if p != victim for k in ks}
    assert set(scan(store)) == survivors
    assert store.tree == HashTree.build(KEYSPACE, _stored_items(store))
    assert store.tree.partition_root(victim) == 0
    assert len(store) == len(survivors)


def test_read_segment_returns_exactly_that_segment(store: Store) -> None:
    keys = [b"seg-%d" % i for i in range(300)]
    store.apply_deltas([(k, gc(1)) for k in keys])
    for partition in range(KEYSPACE.partitions):
        for segment in range(KEYSPACE.segments):
            leaf = partition * KEYSPACE.segments + segment
            expected = {k for k in keys if KEYSPACE.leaf_of(k) == leaf}
            assert {k for k, _ in store.read_segment(partition, segment)} == expected


def test_reopen_rebuilds_tree_and_counts(tmp_path: Path) -> None:
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as first:
        first.apply_deltas([(b"r%d" % i, gc(i + 1)) for i in range(300)])
        first.drop_partition(3)
        counts = [first.count(p) for p in range(KEYSPACE.partitions)]
        tree = first.tree
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as second:
        assert second.tree == tree
        assert [second.count(p) for p in range(KEYSPACE.partitions)] == counts
        second.rebuild_tree()
        assert second.tree == tree


def _stored_items(store: Store) -> list[tuple[bytes, bytes]]:
    return [(KEYSPACE.prefix(k) + k, v) for k, v in scan(store).items()]


# -- damaged or foreign data directories -------------------------------------------------------

def _make_store(path: Path) -> None:
    with Store(path, crdt.merge_encoded, KEYSPACE) as made:
        made.apply_deltas([(b"x%d" % i, gc(i + 1)) for i in range(2000)])


def test_garbage_current_file_is_a_store_error(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")
    (tmp_path / "db" / "CURRENT").write_text("garbage\n")
    with pytest.raises(StoreError, match="cannot open store"):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_corrupt_log_is_a_store_error(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")
    for log in (tmp_path / "db").glob("*.log"):
        data = bytearray(log.read_bytes())
        data[len(data) // 2] ^= 0xFF
        log.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="(?i)corruption"):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_corrupt_table_is_a_store_error(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")
    db = plyvel.DB(str(tmp_path / "db"))
    db.compact_range()
    db.close()
    tables = list((tmp_path / "db").glob("*.ldb"))
    assert tables
    for table in tables:
        data = bytearray(table.read_bytes())
        for i in range(64, len(data), 499):
            data[i] ^= 0xFF
        table.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="(?i)corruption"):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_truncated_table_is_refused_at_open_naming_it(tmp_path: Path) -> None:
    # LevelDB itself notices a short table only when a read reaches it (and a store that
    # loads its tree snapshot reads none at open)
    _make_store(tmp_path / "db")
    db = plyvel.DB(str(tmp_path / "db"))
    db.compact_range()
    db.close()
    table = max((tmp_path / "db").glob("*.ldb"), key=lambda t: t.stat().st_size)
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    with pytest.raises(StoreOpenError, match=f"table {table.name} holds .*truncated"):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_missing_current_file_is_refused(tmp_path: Path) -> None:
    # without CURRENT, LevelDB would start an empty database beside the old files
    _make_store(tmp_path / "db")
    (tmp_path / "db" / "CURRENT").unlink()
    with pytest.raises(StoreOpenError, match="CURRENT file is missing.*move the directory"):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_open_reports_new_clean_unclean_and_lost(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path, crdt.merge_encoded, KEYSPACE) as store:
        assert store.opened.state == "new" and not store.opened.needs_repair
        store.apply_deltas([(b"x%d" % i, gc(i + 1)) for i in range(2000)])
    assert (path / CLOSE_RECORD).exists()
    with Store(path, crdt.merge_encoded, KEYSPACE) as store:
        assert (store.opened.state, store.opened.expected_keys, store.opened.found_keys) == \
            ("clean", 2000, 2000)
        assert not (path / CLOSE_RECORD).exists()  # gone while open: a kill leaves none
    _kill_while_open(path)
    with Store(path, crdt.merge_encoded, KEYSPACE) as store:
        assert store.opened.state == "unclean" and store.opened.needs_repair
        assert "not closed cleanly" in store.opened.describe(store.path)
        store.apply_deltas([(b"y%d" % i, gc(i + 1)) for i in range(500)])  # in the log only
    # closed cleanly, then the log loses its tail: LevelDB drops it without a word
    (log,) = path.glob("*.log")
    log.write_bytes(log.read_bytes()[: log.stat().st_size * 3 // 100])
    with Store(path, crdt.merge_encoded, KEYSPACE) as store:
        assert store.opened.state == "lost" and store.opened.needs_repair
        assert store.opened.expected_keys == 2600
        assert 2100 <= store.opened.found_keys == len(store) < 2600
        assert f"2600 keys expected, {len(store)} found" in store.opened.describe(store.path)
    with Store(path, crdt.merge_encoded, KEYSPACE) as store:
        assert store.opened.state == "clean"  # what is left is what was closed


def _kill_while_open(path: Path) -> None:
    """Open the store in another process, write 100 keys and exit without closing it."""
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[2])
        from shard.keyspace import Keyspace
        from shard.store import Store
        store = Store(sys.argv[1], lambda old, delta: delta,
                      Keyspace(partitions=16, segments=4, salt=b"store-tests"))
        store.apply_deltas([(b"after-%d" % i, b"five") for i in range(100)])
        os._exit(0)  # no close(): no new snapshot
    """)
    subprocess.run([sys.executable, "-c", script, str(path), str(ROOT)], check=True)


def test_unusable_paths_are_store_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(StoreError):
        Store(a_file, crdt.merge_encoded, KEYSPACE)
    with pytest.raises(StoreError):
        Store(tmp_path / "absent", crdt.merge_encoded, KEYSPACE, create=False)
    with (Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE),
          pytest.raises(StoreError, match="lock")):
        Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE)


def test_foreign_or_mismatched_directories_are_refused(tmp_path: Path) -> None:
    foreign = plyvel.DB(str(tmp_path / "foreign"), create_if_missing=True)
    foreign.put(b"someone else's key", b"value")
    foreign.close()
    with pytest.raises(StoreError, match="no tasknet store metadata"):
        Store(tmp_path / "foreign", crdt.merge_encoded, KEYSPACE)
    _make_store(tmp_path / "db")
    with pytest.raises(StoreError, match="another key space"):
        Store(tmp_path / "db", crdt.merge_encoded,
              Keyspace(partitions=16, segments=4, salt=b"other"))


# -- crash durability --------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import crdt
    from shard.keyspace import Keyspace
    from shard.store import Store

    keyspace = Keyspace(partitions=16, segments=4, salt=b"store-tests")
    store = Store(sys.argv[1], crdt.merge_encoded, keyspace)
    batch = 0
    while True:
        value = crdt.encode(crdt.GCounter({"w": batch + 1}))
        items = [(b"k-%d-%d" % (batch, i), value) for i in range(50)]
        items.append((b"shared-%d" % (batch % 7), value))
        store.apply_deltas(items, sync=True)
        print(batch, flush=True)  # acknowledged: durable from here on
        batch += 1
""")


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ROOT)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    acknowledged = -1
    try:
        for line in writer.stdout:
            acknowledged = int(line)
            if acknowledged >= 60:
                break
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        rest = writer.stdout.read()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    acknowledged = max([acknowledged, *(int(x) for x in rest.split())])
    assert acknowledged >= 60
    with Store(path, crdt.merge_encoded, KEYSPACE) as reopened:
        for batch in range(acknowledged + 1):
            value = gc(batch + 1)
            for i in range(50):
                assert reopened.get(b"k-%d-%d" % (batch, i)) == value
        for shared in range(7):
            last = max(b for b in range(acknowledged + 1) if b % 7 == shared)
            state = reopened.get(b"shared-%d" % shared)
            assert state is not None and crdt.decode(state).value() >= last + 1
        assert reopened.tree == HashTree.build(KEYSPACE, _stored_items(reopened))


def test_put_states_last_state_wins(store: Store) -> None:
    store.apply_deltas([(b"a", gc(9))])
    store.put_states([(b"a", gc(1)), (b"b", gc(4)), (b"a", gc(2))])
    assert scan(store) == {b"a": gc(2), b"b": gc(4)}
    assert store.tree == HashTree.build(KEYSPACE, _stored_items(store))
    assert len(store) == 2


# -- the tree snapshot -------------------------------------------------------------------------

def test_clean_close_saves_the_tree_for_the_next_open(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")
    # Change a value behind the store's back: a reopen that rescanned would see it, one that
    # loads the snapshot saved by close() does not.
    raw = plyvel.DB(str(tmp_path / "db"))
    raw.put(KEYSPACE.prefix(b"x1") + b"x1", gc(777))
    raw.close()
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as reopened:
        assert reopened.get(b"x1") == gc(777)
        assert reopened.tree != HashTree.build(KEYSPACE, _stored_items(reopened))


def test_snapshot_is_not_reused_after_an_unclean_exit(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")  # closed cleanly: a snapshot exists
    _kill_while_open(tmp_path / "db")
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as reopened:
        assert reopened.get(b"after-7") == b"five"
        assert reopened.tree == HashTree.build(KEYSPACE, _stored_items(reopened))
        assert len(reopened) == 2100


def test_unusable_snapshot_falls_back_to_a_scan(tmp_path: Path) -> None:
    _make_store(tmp_path / "db")
    raw = plyvel.DB(str(tmp_path / "db"))
    raw.put(b"\x00\x00", b"not a snapshot")
    raw.close()
    with Store(tmp_path / "db", crdt.merge_encoded, KEYSPACE) as reopened:
        assert reopened.tree == HashTree.build(KEYSPACE, _stored_items(reopened))
        assert len(reopened) == 2000
