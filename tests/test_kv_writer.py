# The group-commit writer (kv/writer.py) on a real LevelDB store: concurrent read-modify-write
# mutations are grouped into few synced writes, each applied once, and durable.
from pathlib import Path

import trio

import crdt
from kv.writer import GroupCommitWriter
from shard.store import Store


def _increment(current: bytes | None) -> bytes:
    """A mutation: the delta that adds 1 for actor "a" to the current counter."""
    state = crdt.decode(current) if current is not None else crdt.new("pncounter")
    return crdt.encode(state.increment("a", 1))


def test_concurrent_mutations_are_durable_and_each_counted_once(tmp_path: Path) -> None:
    async def main() -> None:
        store = Store(tmp_path / "s", crdt.merge_encoded)
        writer = GroupCommitWriter(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            for _ in range(20):  # each round: one mutation of every key at once
                async with trio.open_nursery() as round_:
                    for k in range(10):
                        round_.start_soon(writer.mutate, b"k%d" % k, _increment)
            nursery.cancel_scope.cancel()
        assert writer.writes == 200 and writer.batches < 200  # grouped, not one per write
        store.close()

    trio.run(main)
    with Store(tmp_path / "s", crdt.merge_encoded) as reopened:
        values = [crdt.decode(reopened.get(b"k%d" % k)).value() for k in range(10)]
    assert values == [20] * 10
