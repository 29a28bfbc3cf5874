# The group-commit writer (kv/writer.py) on a real LevelDB store: concurrent read-modify-write
# mutations are grouped into few synced writes, each applied once, and durable; and the form
# it stores a key's first delta in is the one replicas store.
import tempfile
import threading
from pathlib import Path

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import crdt
from kv.ops import Op, make_delta
from kv.writer import GroupCommitWriter, KeyState, Made
from shard.store import Store


def _increment(current: KeyState) -> Made:
    """A mutation: the delta that adds 1 for actor "a" to the current counter."""
    state = current.state if current.exists else crdt.new("pncounter")
    delta = state.increment("a", 1)
    return crdt.encode(delta), delta, False


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


INT64 = st.integers(-2**63, 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(op=st.one_of(
    st.builds(lambda v: Op("put", b"k", (v,)), st.one_of(st.text(), INT64, st.none(),
                                                         st.lists(INT64, max_size=3))),
    st.builds(lambda n: Op("incr", b"k", (n,)), st.integers(-10**6, 10**6)),
    st.builds(lambda ms: Op("sadd", b"k", tuple(ms)), st.lists(st.text(max_size=4), min_size=1,
                                                                max_size=4)),
    st.builds(lambda m: Op("srem", b"k", (m,)), st.text(max_size=4)),
    st.builds(lambda f, v: Op("hset", b"k", (f, v)), st.text(max_size=4), INT64),
    st.just(Op("hdel", b"k", ("f",))), st.just(Op("delete", b"k"))),
    actor=st.sampled_from(["a", "b", "12D3KooW"]), now_ms=st.integers(1, 2**44))
def test_a_first_delta_is_already_in_the_form_a_replica_stores(op: Op, actor: str, now_ms: int):
    # the writer stores a key's first delta as encoded, without merge_encoded(None, delta);
    # replicas store merge_encoded(None, delta): the bytes must be the same on both
    made = make_delta(op, None, actor, crdt.HLC(), now_ms)
    if op.kind in ("srem", "hdel"):  # a removal from a missing key writes nothing
        assert made is None
        return
    delta = crdt.encode(made)
    assert crdt.merge_encoded(None, delta) == delta


class _GatedStore(Store):
    """A store whose synced write waits for `gate` (so a test can cancel the writer while
    the disk write is running)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writing = threading.Event()
        self.gate = threading.Event()

    def write_filled(self, batch) -> None:
        self.writing.set()
        assert self.gate.wait(10), "the test never opened the gate"
        super().write_filled(batch)


def test_a_write_running_when_the_writer_is_cancelled_is_finished_and_accounted(
        tmp_path: Path) -> None:
    async def main() -> None:
        store = _GatedStore(tmp_path / "s", crdt.merge_encoded)
        writer = GroupCommitWriter(store)
        outcome: list[object] = []

        async def submit() -> None:
            try:
                await writer.merge([(b"k", crdt.encode(crdt.new("pncounter").increment("a", 7)))])
                outcome.append("durable")
            except Exception as exc:  # WriterStopped would say it was not written
                outcome.append(exc)

        shutdown = trio.CancelScope()

        async def run_writer() -> None:
            with shutdown:
                await writer.run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_writer)
            nursery.start_soon(submit)
            await trio.to_thread.run_sync(store.writing.wait, 10)
            shutdown.cancel()  # the writer is stopped while its disk write runs
            await trio.testing.wait_all_tasks_blocked()
            assert not outcome  # the caller is still waiting: nothing known yet
            store.gate.set()
        assert outcome == ["durable"]  # the write was finished, and said so
        assert writer.writes == 1  # the batch was accounted, not dropped
        # the hash tree is in step with the data: the same as a rebuild from a full scan
        roots = store.tree.partition_roots()
        store.rebuild_tree()
        assert store.tree.partition_roots() == roots and any(roots)
        store.close()

    trio.run(main)
    with Store(tmp_path / "s", crdt.merge_encoded) as reopened:
        assert crdt.decode(reopened.get(b"k")).value() == 7


_OPS_ON_ONE_KEY = st.lists(st.one_of(
    st.builds(lambda v: Op("put", b"k", (v,)), st.integers(0, 9)),
    st.builds(lambda n: Op("incr", b"k", (n,)), st.integers(-5, 5)),
    st.builds(lambda m: Op("sadd", b"k", (m,)), st.sampled_from("abcd")),
    st.just(Op("sadd", b"k2", ())),  # refused on a key that holds nothing
    st.builds(lambda m: Op("srem", b"k", (m,)), st.sampled_from("abcd")),
    st.builds(lambda f: Op("hset", b"k", (f, 1)), st.sampled_from("fg")),
    st.builds(lambda f: Op("hdel", b"k", (f,)), st.sampled_from("fg")),
    st.just(Op("delete", b"k"))), min_size=2, max_size=12)


def _op_mutation(op: Op, clock: crdt.HLC):
    """What the write path's mutation does with an op (kv/writes.py), in short."""
    def apply(current: KeyState):
        delta = make_delta(op, current.state, "a", clock, 1_700_000_000_000)
        return None if delta is None else (crdt.encode(delta), delta, False)
    return apply


@settings(max_examples=60, deadline=None)
@given(first=st.sampled_from([Op("sadd", b"k", tuple("xyz")), Op("put", b"k", (0,)),
                              Op("incr", b"k", (3,)), Op("hset", b"k", ("f", 0))]),
       ops=_OPS_ON_ONE_KEY)
def test_ops_of_one_key_in_one_batch_decode_once_and_do_what_they_do_one_batch_each(
        first: Op, ops: list[Op]) -> None:
    # one batch works on the decoded state and encodes it once; each op still gets its own
    # delta or error, and the key ends with the same bytes as when each op is its own batch
    decodes: list[int] = []

    def counting(data, *args, **kwargs):
        decodes.append(len(data))
        return decode(data, *args, **kwargs)

    decode = crdt.decode

    async def run(path: Path, together: bool) -> tuple[list[object], tuple]:
        clock = crdt.HLC()
        store = Store(path, crdt.merge_encoded)
        writer = GroupCommitWriter(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.mutate_many([(b"k", _op_mutation(first, clock))])
            results: list[object] = []
            crdt.decode = counting
            try:
                if together:
                    results = await writer.mutate_many([(op.key, _op_mutation(op, clock))
                                                        for op in ops])
                else:
                    for op in ops:
                        results += await writer.mutate_many([(op.key, _op_mutation(op, clock))])
            finally:
                crdt.decode = decode
            nursery.cancel_scope.cancel()
        state = (store.get(b"k"), store.get(b"k2"))
        store.close()
        return [r if isinstance(r, bytes | None) else (type(r), str(r)) for r in results], state

    with tempfile.TemporaryDirectory() as tmp:
        alone = trio.run(run, Path(tmp) / "alone", False)
        decodes.clear()
        together = trio.run(run, Path(tmp) / "together", True)
    assert together == alone
    assert len(decodes) <= 1  # the stored state, once (the first op's delta is never decoded)
