# The clock skew bound of the KV store, with real nodes (libp2p on 127.0.0.1, LevelDB dirs):
# a peer's far-future register is refused on every way in (replication batches, anti-entropy,
# read answers), never stored or spread, and does not lock the key; a refused replica write is
# not acknowledged; a far-future state stored before the bound existed is replaced by an
# operator's override_skew write on every replica, and a straggler heals on the next read;
# a handoff leaves such a stored state behind instead of getting its sender scored down.
import itertools
import time
from functools import partial

import pytest
import trio

import crdt
from crdt import LWWRegister, ORMap, Timestamp
from kv import OpError, QuorumError
from kv.ops import Op
from kv.replication import APPLY_PROTOCOL, Delta, PeerLink, seal_batch
from kv.writer import GroupCommitWriter, Replace
from p2p import RemoteError
from shard import Keyspace, Store

from kv_helpers import foreign_keys, handles, join, wait_for
from p2p_helpers import alive_ids, cluster

FAR = 2**64 - 1  # the wall time of a forged register (ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def register(value, wall: int, actor: str = "mallory") -> bytes:
    return crdt.encode(LWWRegister().assign(value, Timestamp(wall, 0), actor))


def nested_map(wall: int) -> bytes:
    """A map whose register sits two maps deep."""
    return crdt.encode(ORMap().update("m", "outer", "ormap", lambda inner: inner.update(
        "m", "inner", "lww", lambda reg: reg.assign("evil", Timestamp(wall, 0), "m"))))


def value_of(state: bytes | None):
    return None if state is None else crdt.decode(state).value()


async def seed(kv, key: bytes, state: bytes) -> None:
    """Write `state` straight into a running node's LevelDB store, replacing what is there
    (data stored before the bound existed), between two of its write batches."""
    await kv.writer.exclusive(partial(kv.store.put_state, key, state))


async def test_a_forged_far_future_batch_item_is_refused_and_does_not_lock_the_key(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        victim, honest, attacker = (n.kv for n in nodes)
        net = attacker.net  # a real py-libp2p peer with its own identity, signing its batch
        items = [
            [b"locked", register("evil", FAR), None],
            [b"fine", register("ok", now_ms()), None],
            [b"nested", nested_map(now_ms() + 3_600_000), None],  # an hour ahead, in a map
            [b"hinted", register("evil", FAR), honest.me],  # to be held as a hint
            [b"also-fine", register("ok2", now_ms() - 1000), honest.me],
        ]
        reply = await net.request(victim.me, APPLY_PROTOCOL,
                                  seal_batch(net, items, attacker.next_batch_seq()))
        assert reply == {"n": 5, "refused": [0, 2, 3]}
        assert victim.store.get(b"locked") is None and victim.store.get(b"nested") is None
        assert value_of(victim.store.get(b"fine")) == "ok"  # the valid items were applied
        assert victim.hints.pending() == {honest.me: 1}  # only the valid hinted item
        assert victim.metrics["skew_refused"] == 3
        assert victim.net.scores.offences.get("clock_skew") == 1
        assert victim.net.scores.score(attacker.me, time.monotonic()) < 0
        # the key is not locked: honest writes and deletes of it work, from the victim too
        await victim.put(b"locked", "honest")
        assert await honest.get(b"locked") == "honest"
        await victim.delete(b"locked")
        assert await honest.get(b"locked", consistency="all") is None
        await victim.put(b"nested", 1)
        assert await attacker.get(b"nested") == 1


async def test_anti_entropy_does_not_spread_a_far_future_state(tmp_path, monkeypatch):
    async with handles(tmp_path, 3) as nodes:
        holder, a, b = (n.kv for n in nodes)
        await holder.put("other", "valid", consistency="all")
        await seed(holder, b"old", register("from before the fix", FAR))
        await seed(holder, b"old-map", nested_map(FAR))
        # the holder offers its whole store, as a node without the bound does
        monkeypatch.setattr(holder.repair, "offered_segment", holder.store.read_segment)
        # anti-entropy runs every second: both peers meet the holder's states and refuse them
        await wait_for(lambda: a.metrics["skew_refused"] >= 2 and b.metrics["skew_refused"] >= 2,
                       30, "anti-entropy to offer the far-future states to both peers")
        for kv in (a, b):
            assert kv.store.get(b"old") is None and kv.store.get(b"old-map") is None
            assert kv.net.scores.offences.get("clock_skew", 0) >= 1
        # the key reads as absent (the only answer is beyond the bound), not as the old value
        assert await a.get(b"old", consistency="all") is None
        assert value_of(holder.store.get(b"old")) == "from before the fix"  # never spread
        # a node with the bound does not offer such states: its peers never refuse (nor score
        # it down for) what it keeps from before the bound
        monkeypatch.undo()
        refused = {kv.me: kv.metrics["skew_refused"] for kv in (a, b)}
        since = time.monotonic()
        await wait_for(lambda: all(max(kv.last_anti_entropy.values(), default=0) > since + 2
                                   for kv in (holder, a, b)), 30, "two more rounds each")
        assert {kv.me: kv.metrics["skew_refused"] for kv in (a, b)} == refused
        assert a.store.get(b"old") is None and b.store.get(b"old") is None


async def test_handoff_leaves_far_future_states_behind_and_completes(tmp_path):
    # no anti-entropy: what the newcomer gets, it gets from the handoff
    quiet = {"anti_entropy_interval": 3600.0}
    async with handles(tmp_path, 3, **quiet) as nodes:
        written = {f"k{i}": i for i in range(300)}
        await nodes[0].kv.put_many(written, consistency="all")
        future = [f"future-{i}".encode() for i in range(20)]
        for node in nodes:  # N = 3 of 3 nodes: every node holds every key
            for key in future:  # stored before the bound existed
                await seed(node.kv, key, register("from the future", FAR))
        senders = [n.kv for n in nodes]
        newcomer = await join(nodes, tmp_path / "node3", **quiet)
        kvs = [*senders, newcomer]
        owned = [k.encode() for k in written
                 if newcomer.me in newcomer.ring.preference_list(k.encode())]
        owned_future = [k for k in future if newcomer.me in newcomer.ring.preference_list(k)]
        assert owned and owned_future

        def handed_off() -> bool:
            return (all(newcomer.store.get(k) is not None for k in owned)
                    and not any(kv.handoff_progress for kv in kvs)
                    and all(foreign_keys(kv) == 0 for kv in kvs))

        # every old owner handed its partitions off and dropped them, far-future states too
        await wait_for(handed_off, 120, "the handoff to the newcomer and the drops")
        # the senders are honest: nothing was refused, nobody was scored down for it
        assert "clock_skew" not in newcomer.net.scores.offences
        assert newcomer.metrics["skew_refused"] == 0
        assert all(newcomer.net.scores.score(kv.me, time.monotonic()) >= 0 for kv in senders)
        assert all(newcomer.store.get(k) is None for k in owned_future)
        assert sum(kv.metrics["handoff_skew_withheld"] for kv in senders) >= len(owned_future)
        assert sum(kv.metrics["handoff_keys_sent"] for kv in senders) > 0
        assert await newcomer.get_many([k.decode() for k in owned]) == [
            written[k.decode()] for k in owned]


async def test_a_refused_replica_write_is_not_acknowledged(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        mutator, fine, skewed = (n.kv for n in nodes)
        skewed.timebound.max_skew_ms = -3_600_000  # its bound now refuses everything
        with pytest.raises(QuorumError):  # ALL needs the skewed replica's ack
            await mutator.put("k", "v", consistency="all")
        assert skewed.store.get(b"k") is None
        assert skewed.metrics["skew_refused"] >= 1
        await mutator.put("k2", "v2", consistency="quorum")  # the mutator and `fine` suffice
        assert value_of(fine.store.get(b"k2")) == "v2"
        assert skewed.store.get(b"k2") is None
        assert mutator.hints.pending() == {}  # refused items are dropped, never hinted


async def test_reply_accounting_of_refused_items(tmp_path):
    """A PeerLink counts an item the peer says it refused as a failed replica write, and an
    older node's plain-count reply as all applied."""
    async with cluster(tmp_path, 2) as (sender, receiver):
        await wait_for(lambda: receiver.peer_id in alive_ids(sender), 15, "the receiver alive")
        replies = [{"n": 3, "refused": [1]}, 3]
        got: list[list] = []

        async def on_apply(peer, data):
            got.append(data)
            return replies[len(got) - 1]

        receiver.handle(APPLY_PROTOCOL, on_apply)
        failed: list[list[Delta]] = []
        link = PeerLink(sender, receiver.peer_id, 512, 1 << 20, 100,
                        lambda peer, batch: failed.append(batch),
                        itertools.count(time.time_ns() // 1000).__next__)
        outcomes: dict[int, list[bool]] = {0: [], 1: []}

        def item(batch: int, i: int) -> Delta:
            return Delta(b"k%d" % i, register(i, 1), None, outcomes[batch].append)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            for i in range(3):
                link.push_nowait(item(0, i))
            await wait_for(lambda: len(outcomes[0]) == 3, 15, "the first batch's outcomes")
            for i in range(3):
                link.push_nowait(item(1, i))
            await wait_for(lambda: len(outcomes[1]) == 3, 15, "the second batch's outcomes")
            nursery.cancel_scope.cancel()
        assert outcomes == {0: [True, False, True], 1: [True, True, True]}
        assert not failed
        assert link.sent == 5


async def test_operator_override_replaces_far_future_states_on_every_replica(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        kvs = [n.kv for n in nodes]
        a, b, c = kvs
        for kv in kvs:  # every replica holds a far-future state from before the fix
            await seed(kv, b"stuck", register("from before", FAR))
            await seed(kv, b"stuck-too", register("from before", FAR))
        assert await a.get(b"stuck") is None  # reads as absent
        for write in (partial(a.put, b"stuck", "new"), partial(b.delete, b"stuck")):
            with pytest.raises(OpError) as refused:
                await write()
            assert refused.value.code == "clock_skew"
            assert "override_skew" in str(refused.value)
        await b.put(b"stuck", "new", override_skew=True)  # b forwards it to the mutator
        await wait_for(lambda: all(value_of(kv.store.get(b"stuck")) == "new" for kv in kvs),
                       20, "every replica to hold the override")
        assert [await kv.get(b"stuck") for kv in kvs] == ["new"] * 3
        await c.put(b"stuck", "newer")  # an ordinary write works again
        assert await a.get(b"stuck", consistency="all") == "newer"
        await c.delete(b"stuck-too", override_skew=True)
        await wait_for(lambda: all(kv.store.get(b"stuck-too") is not None
                                   and crdt.decode(kv.store.get(b"stuck-too")).deleted
                                   for kv in kvs), 20, "every replica to hold the tombstone")
        assert await b.get(b"stuck-too", consistency="all") is None
        # a straggler that missed the override is replaced by the next read
        await seed(c, b"stuck", register("from before", FAR))
        assert await a.get(b"stuck", consistency="all") == "newer"
        await wait_for(lambda: value_of(c.store.get(b"stuck")) == "newer", 20,
                       "the read to repair the straggler")
        assert a.metrics["skew_refused"] >= 1


async def test_replace_is_decided_in_the_group_commit_and_keeps_valid_state(tmp_path):
    with Store(tmp_path / "store", merge=crdt.merge_encoded, keyspace=Keyspace(64)) as store:
        writer = GroupCommitWriter(store)
        later = now_ms() + 60_000  # ahead, but within a 5-minute bound: valid data
        store.put_state(b"far", register("far", FAR))
        store.put_state(b"near", register("near", later))

        def stale(state: bytes) -> bool:
            return crdt.latest_wall(state) > now_ms() + 300_000

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            fresh = register("override", now_ms(), "operator")
            await writer.merge([(b"far", Replace(fresh, stale)), (b"near", Replace(fresh, stale)),
                                (b"none", Replace(fresh, stale))])
            nursery.cancel_scope.cancel()
        assert value_of(store.get(b"far")) == "override"  # replaced
        assert value_of(store.get(b"near")) == "near"  # merged: the later valid write wins
        assert value_of(store.get(b"none")) == "override"


async def test_a_malformed_batch_is_still_refused_whole(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        victim, attacker = nodes[0].kv, nodes[1].kv
        net = attacker.net
        items = [[b"fine", register("ok", now_ms()), None], [b"bad", b"\x97\x01\x01", None]]
        with pytest.raises(RemoteError):
            await net.request(victim.me, APPLY_PROTOCOL,
                              seal_batch(net, items, attacker.next_batch_seq()))
        assert victim.store.get(b"fine") is None
        with pytest.raises(RemoteError):  # an override flag that is not a bool
            await net.request(victim.me, APPLY_PROTOCOL,
                              seal_batch(net, [[b"k", register(1, 1), None, "yes"]],
                                         attacker.next_batch_seq()))


def test_the_override_travels_with_a_forwarded_op():
    put = Op("put", b"k", ("v",), True)
    assert put.to_wire() == ["put", b"k", ["v"], True]
    assert Op.from_wire(put.to_wire()) == put
    plain = Op("delete", b"k")
    assert plain.to_wire() == ["delete", b"k", []]  # what older nodes send and accept
    assert Op.from_wire(["delete", b"k", []]) == plain and not plain.override_skew
    for bad in (["incr", b"k", [1], True], ["put", b"k", ["v"], "yes"],
                ["put", b"k", ["v"], True, 1]):
        with pytest.raises(OpError):
            Op.from_wire(bad)
    assert Delta(b"k", b"d", None, None, True).to_wire() == [b"k", b"d", None, True]
    assert Delta(b"k", b"d", "p", None).to_wire() == [b"k", b"d", "p"]
