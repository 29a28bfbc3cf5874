# System tests of the replicated KV store: real nodes (libp2p on 127.0.0.1, LevelDB dirs).
import contextlib
import errno
import os
import time
from collections import Counter
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio

import crdt
from kv import Consistency, KVConfig, OpError, OutcomeUnknown, QuorumError
from kv.forwarding import OPS_PROTOCOL
from kv.ops import Op, render
from kv.replication import APPLY_PROTOCOL, seal_batch
from p2p import RemoteError, RequestError
from p2p.envelope import seal
from p2p.identity import Identity
from tasknet_node.kv_extension import _classify

from kv_helpers import (
    NodeHandle,
    copies_on_disk,
    foreign_keys,
    handles,
    join,
    key_forwarded_to,
    stall_forwarded_ops,
    start_kv_node,
    wait_for,
    wait_for_ring,
)

N = 3


async def test_writes_from_every_coordinator_land_on_exactly_n_replicas(tmp_path):
    async with handles(tmp_path, 5) as nodes:
        kvs = [n.kv for n in nodes]
        expected = {}
        for c, kv in enumerate(kvs):  # every node coordinates a share of the 10k writes
            for part in range(4):
                batch = {f"user:{c}:{part}:{i}": {"n": i, "by": c} for i in range(490)}
                await kv.put_many(batch)
                expected.update(batch)
        singles = {f"single:{i}": i for i in range(200)}
        for i, (key, value) in enumerate(singles.items()):
            await kvs[i % 5].put(key, value)
        expected.update(singles)
        keys = sorted(expected)
        for kv in kvs:  # every key readable from every node
            assert await kv.get_many(keys) == [expected[k] for k in keys]
        await wait_for(lambda: all(foreign_keys(kv) == 0 for kv in kvs), 30,
                       "no node to hold keys outside its partitions")
        dirs = [n.data_dir for n in nodes]
    holders = copies_on_disk(dirs)
    assert set(holders) == {k.encode() for k in keys}
    assert set(holders.values()) == {N}, Counter(holders.values())


async def test_typed_operations_and_deletes(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        a, b, c = (n.kv for n in nodes)
        await a.incr("visits", 5)
        await b.incr("visits", -2)
        await c.incr("visits")
        assert await a.get("visits") == 4
        await a.sadd("tags", "x", "y", "z")
        await b.srem("tags", "y")
        assert await c.get("tags") == ["x", "z"]
        await c.hset("profile", "name", "ada")
        await a.hset("profile", "lang", "py")
        await b.hdel("profile", "lang")
        assert await a.get("profile") == {"name": "ada"}
        with pytest.raises(OpError):
            await a.sadd("visits", "not-a-counter")
        await a.put("doc", "v1")
        await b.delete("doc")
        assert await c.get("doc") is None
        await c.put("doc", "v2")  # a deleted key can be written again
        assert await a.get("doc") == "v2"
        # as a register only, while its tombstone is kept: a set's state cannot merge into
        # it on any replica (this failed as "not stored here" before it was refused clearly)
        await b.delete("doc")
        with pytest.raises(OpError, match="deleted as a register") as refused:
            await a.sadd("doc", "x")
        assert refused.value.code == "wrong_type"
        assert await c.get("doc") is None
        await a.put("doc", "v3")
        assert await b.get("doc") == "v3"
        await a.delete("tags")
        assert await b.get("tags") == []
        # removing from a key that holds nothing leaves it missing, free to take any type
        await b.srem("nothing-yet", "x")
        await c.hdel("nothing-yet", "f")
        assert await a.get("nothing-yet", consistency="all") is None
        assert all(kv.store.get(b"nothing-yet") is None for kv in (a, b, c))
        await a.incr("nothing-yet", 2)
        assert await b.get("nothing-yet") == 2


async def test_a_removal_sees_writes_its_replica_missed(tmp_path):
    # an add acknowledged by two of three replicas, and a removal applied by the third,
    # which missed the add: the removal still takes it away (it reads a quorum first)
    async with handles(tmp_path, 3) as nodes:
        a, b, c = (n.kv for n in nodes)
        added = crdt.encode(crdt.new("orset").add_many(a.me, ("x", "y")))
        fields = crdt.new("ormap")
        fields = fields.merge(fields.update(a.me, "f", "lww",
                                            lambda reg: reg.assign(1, crdt.HLC().now(1), a.me)))
        for kv in (a, b):  # the state as two replicas hold it after a quorum write
            await kv.writer.merge([(b"tags", added), (b"fields", crdt.encode(fields))])
        assert c.store.get(b"tags") is None and c.store.get(b"fields") is None
        outcomes = await c.writes.apply_and_replicate(
            [Op("srem", b"tags", ("y",)), Op("hdel", b"fields", ("f",))], Consistency.QUORUM)
        assert outcomes == [None, None]
        assert await b.get("tags", consistency="all") == ["x"]
        assert await a.get("fields", consistency="all") == {}
        assert c.metrics["observed_removals"] == 2


async def test_a_stopped_replica_catches_up_through_hints_and_anti_entropy(tmp_path):
    async with handles(tmp_path, 4) as nodes:
        victim = nodes[3]
        victim_id = victim.kv.me
        await victim.stop()
        live = [n.kv for n in nodes[:3]]
        await wait_for(lambda: all(victim_id not in kv.net.view.alive_ids() for kv in live), 15,
                       "the others to see the replica down")
        written = {f"k{i}": i for i in range(400)}
        await live[0].put_many(written)  # quorum writes succeed with one replica down
        assert sum(sum(kv.hints.pending().values()) for kv in live) > 0
        # ALL needs every replica of the preference list: a fallback's hint does not count
        all_key = next(f"all{i}" for i in range(1000)
                       if victim_id in live[0].ring.preference_list(f"all{i}".encode()))
        with trio.fail_after(5), pytest.raises(QuorumError):  # refused at once, not timed out
            await live[0].put(all_key, "all", consistency="all")
        written[all_key] = "all"  # stored where it could be, and hinted to the victim
        restarted = await victim.start()
        assert restarted.me == victim_id
        took = await wait_for_ring([n.kv for n in nodes])
        print(f"the restarted replica was in every ring after {took:.1f}s")
        owned = [k for k in written
                 if victim_id in restarted.ring.preference_list(k.encode())]
        assert owned, "the victim owns some keys"

        def caught_up():
            return all(restarted.store.get(k.encode()) is not None for k in owned)

        # generous: a stream to the restarted node can stall on py-libp2p's stale connection
        # for a request timeout (10 s) before the redial, more than once on a loaded machine
        await wait_for(caught_up, 60, "the restarted replica to hold every key it owns")
        await wait_for(lambda: all(not kv.hints.pending() for kv in live), 60,
                       "all hints delivered")
        assert await restarted.get_many(sorted(written)) == [written[k]
                                                              for k in sorted(written)]


async def test_a_joining_node_takes_its_share_and_the_others_drop_it(tmp_path):
    async with handles(tmp_path, 5) as nodes:
        written = {f"k{i}": i for i in range(1500)}
        await nodes[0].kv.put_many(written)
        # every replica holds every key before the join, so the replicas that keep a
        # partition hold what its leaving owner holds and need nothing from it
        await wait_for(lambda: sum(len(n.kv.store) for n in nodes) == N * len(written), 30,
                       "every key on its N replicas before the join")
        newcomer = await join(nodes, tmp_path / "node5")
        kvs = [n.kv for n in nodes]
        share = len(newcomer.ring.partitions_of(newcomer.me, primary_only=True))
        assert 0.7 / 6 < share / newcomer.ring.partitions < 1.3 / 6
        owned = [k for k in written if newcomer.me in newcomer.ring.preference_list(k.encode())]

        def handed_off():
            return all(newcomer.store.get(k.encode()) is not None for k in owned) and all(
                not kv.handoff_progress for kv in kvs)

        await wait_for(handed_off, 120, "handoff to the newcomer and drops at the others")
        # each moved key travelled at most once: from the owner that left its preference
        # list to the newcomer, not also from an owner that stayed, nor to owners that had it
        # (anti-entropy with the newcomer may deliver a partition first: then none is sent)
        assert 0 < sum(kv.metrics["handoff_keys_sent"] for kv in kvs) <= len(owned)
        assert await newcomer.get_many(sorted(written)) == [written[k]
                                                             for k in sorted(written)]
        await wait_for(lambda: all(foreign_keys(kv) == 0 for kv in kvs), 30,
                       "the old owners to drop what they handed off")
        dirs = [n.data_dir for n in nodes]
    holders = copies_on_disk(dirs)
    assert set(holders) == {k.encode() for k in written}
    assert set(holders.values()) == {N}


async def test_a_node_joining_a_cluster_smaller_than_n_gets_one_push_of_everything(tmp_path):
    async with handles(tmp_path, 2) as nodes:
        written = {f"k{i}": i for i in range(300)}
        await nodes[0].kv.put_many(written)
        await wait_for(lambda: all(len(n.kv.store) == len(written) for n in nodes), 30,
                       "both nodes to hold every key")
        newcomer = await join(nodes, tmp_path / "node2")
        kvs = [n.kv for n in nodes]
        # no owner left any preference list (2 nodes, N = 3): the first owner that stayed
        # pushes each partition, and only it
        await wait_for(lambda: len(newcomer.store) == len(written), 60,
                       "the newcomer to receive every key")
        await wait_for(lambda: not any(kv.handoff.pushes for kv in kvs), 30,
                       "the pushes to be confirmed")
        # one pusher per partition (anti-entropy may have delivered some partitions first)
        assert 0 < sum(kv.metrics["handoff_keys_sent"] for kv in kvs) <= len(written)
        assert all(len(kv.store) == len(written) for kv in kvs)


async def test_split_brain_counters_and_sets_merge_after_heal(tmp_path):
    async with handles(tmp_path, 4) as nodes:
        kvs = [n.kv for n in nodes]
        await kvs[0].incr("hits", 1)
        await kvs[0].sadd("seen", "before")
        await kvs[0].put("owner", "nobody")
        left, right = kvs[:2], kvs[2:]
        for side, other in ((left, right), (right, left)):
            for kv in side:
                await kv.net.isolate_from({o.me for o in other})
        await wait_for(lambda: all(set(kv.net.view.alive_ids()) <= {o.me for o in side}
                                   for side in (left, right) for kv in side), 15,
                       "both sides to see the split")
        for i in range(10):
            await left[i % 2].incr("hits", 1, consistency="one")
            await right[i % 2].incr("hits", 2, consistency="one")
        await left[0].sadd("seen", "left", consistency="one")
        await right[1].sadd("seen", "right", consistency="one")
        await left[1].put("owner", "left", consistency="one")
        await right[0].put("owner", "right", consistency="one")
        for kv in kvs:
            kv.net.heal()
        await wait_for_ring(kvs, timeout=30)

        async def replicas_agree(key):
            states = {kv.store.get(key) for kv in kvs if kv.me in kv.ring.preference_list(key)}
            return len(states) == 1 and None not in states

        with trio.fail_after(60):
            while not all([await replicas_agree(k) for k in (b"hits", b"seen", b"owner")]):
                await trio.sleep(0.2)
        assert await kvs[3].get("hits") == 1 + 10 * 1 + 10 * 2
        assert await kvs[1].get("seen") == ["before", "left", "right"]
        owner = {await kv.get("owner") for kv in kvs}
        assert len(owner) == 1 and owner <= {"left", "right"}


async def test_garbage_and_forged_replication_batches_are_refused(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        victim, attacker = nodes[0].kv, nodes[1].kv
        key = b"precious"
        await victim.put(key, "safe", consistency="all")  # on every replica before the look
        # find the stored key on the victim, whichever replica set it has
        before = {kv.me: kv.store.get(key) for kv in (n.kv for n in nodes)}
        forger = Identity.generate()
        net = attacker.net
        good_item = [[key, os.urandom(20), None]]
        bad_batches = [
            os.urandom(200),  # not an envelope
            seal(forger, net.config.network_id, "kv.batch", 1, good_item),  # not the sender
            seal_batch(net, "not a list", attacker.next_batch_seq()),
            seal_batch(net, [[key, b"\xc1garbage", None]], attacker.next_batch_seq()),
            seal_batch(net, [["str-key", b"x", None]], attacker.next_batch_seq()),
            msgpack.packb([1, b"body", b"sig"]),
        ]
        for batch in bad_batches:
            # refused with an error reply, or, once the attacker is banned, not served at all
            with pytest.raises(RequestError):
                await net.request(victim.me, APPLY_PROTOCOL, batch)
        assert victim.metrics["refused_batches"] >= 3
        assert victim.net.scores.score(attacker.me, time.monotonic()) < -50
        after = {kv.me: kv.store.get(key) for kv in (n.kv for n in nodes)}
        assert after == before
        honest = nodes[2].kv
        assert await honest.get(key) == "safe"
        await honest.put("still-works", 1)
        assert await victim.get("still-works") == 1


async def test_a_local_disk_fault_answers_unavailable_and_blames_no_peer(tmp_path, monkeypatch):
    async with handles(tmp_path, 2) as nodes:
        receiver, sender = nodes[0].kv, nodes[1].kv
        await sender.put("k", "first", consistency="all")
        state = sender.store.get(b"k")
        assert state is not None and receiver.store.get(b"k") == state

        def disk_full(batch):
            raise OSError(errno.ENOSPC, "No space left on device")

        # the receiver's disk fails under its own writer: the batch it is sent is sound
        monkeypatch.setattr(receiver.store, "write_filled", disk_full)
        await sender.put("k", "second", consistency="one")
        newer = sender.store.get(b"k")
        offences_before = dict(receiver.net.scores.offences)
        score_before = receiver.net.scores.score(sender.me, time.monotonic())
        with pytest.raises(RemoteError) as refused:
            await sender.net.request(receiver.me, APPLY_PROTOCOL,
                                     seal_batch(sender.net, [[b"k", newer, None]],
                                                sender.next_batch_seq()))
        assert refused.value.code == "unavailable"
        assert receiver.net.scores.offences == offences_before
        assert receiver.net.scores.score(sender.me, time.monotonic()) >= score_before
        assert receiver.metrics["refused_batches"] == 0
        # the disk is back: the same state, sent again, is stored, and the peer still served
        monkeypatch.undo()
        await sender.net.request(receiver.me, APPLY_PROTOCOL,
                                 seal_batch(sender.net, [[b"k", newer, None]],
                                            sender.next_batch_seq()))
        assert receiver.store.get(b"k") == newer
        assert await receiver.get("k", consistency="all") == "second"


async def test_forwarded_ops_meeting_a_local_disk_fault_answer_unavailable(tmp_path,
                                                                           monkeypatch):
    async with handles(tmp_path, 4) as nodes:
        kvs = [n.kv for n in nodes]
        coordinator = kvs[0]
        # a key this node does not replicate: its write is forwarded to the first replica
        key = next(k for k in (f"k{i}" for i in range(1000))
                   if coordinator.me not in coordinator.ring.preference_list(k.encode()))
        mutator = next(kv for kv in kvs
                       if kv.me == coordinator.ring.preference_list(key.encode())[0])

        def disk_full(batch):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(mutator.store, "write_filled", disk_full)
        offences_before = dict(mutator.net.scores.offences)
        with pytest.raises(QuorumError, match="unavailable"):
            await coordinator.put(key, "v")
        assert mutator.net.scores.offences == offences_before
        monkeypatch.undo()
        await coordinator.put(key, "v")
        assert await coordinator.get(key) == "v"


async def test_quorum_reads_fail_clearly_when_too_few_replicas(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        await nodes[0].kv.put("k", 1, consistency="all")
        survivor = nodes[0].kv
        for node in nodes[1:]:
            await node.stop()
        await wait_for(lambda: len(survivor.net.view.alive_ids()) == 0, 15, "peers down")
        assert await survivor.get("k", consistency="one") == 1
        with pytest.raises(QuorumError):
            await survivor.get("k", consistency="quorum")


async def test_a_write_to_a_stalled_replica_fails_at_all_and_succeeds_at_quorum(tmp_path):
    async with handles(tmp_path, 3, request_timeout=1.0) as nodes:
        stalled = nodes[2].kv

        async def never_durable(items):  # the replica takes batches and never answers
            await trio.sleep_forever()

        stalled.writer.merge = never_durable
        coordinator = nodes[0].kv
        with trio.fail_after(30):  # the write must end, not hang on the silent replica
            with pytest.raises(QuorumError):
                await coordinator.put("k-all", 1, consistency="all")
            await coordinator.put("k-quorum", 2, consistency="quorum")
        assert coordinator.store.get(b"k-quorum") is not None
        assert nodes[1].kv.store.get(b"k-quorum") is not None
        assert stalled.store.get(b"k-quorum") is None


HEDGE = {"request_timeout": 3.0, "hedge_after_s": 0.5}


@contextlib.asynccontextmanager
async def _first_replica_stalled(tmp_path, prefix):
    """4 nodes with HEDGE timing; a key node 0 forwards to node 1, whose kv-ops handler
    holds every request (it still answers SWIM and replication) until `resume` is set:
    (coordinator, stalled, key, the key's replicas, resume)."""
    async with handles(tmp_path, 4, **HEDGE) as nodes:
        kvs = [n.kv for n in nodes]
        coordinator, stalled = kvs[0], kvs[1]
        key = key_forwarded_to(coordinator, stalled.me, prefix)
        replicas = [kv for kv in kvs if kv.me in coordinator.ring.preference_list(key.encode())]
        yield coordinator, stalled, key, replicas, stall_forwarded_ops(stalled)


def held(kv, key: str):
    """The value `kv`'s own store holds for `key` (no replica asked)."""
    state = kv.store.get(key.encode())
    return render(crdt.decode(state)) if state is not None else None


async def test_a_put_whose_first_replica_is_stalled_is_hedged_to_the_next(tmp_path):
    config = KVConfig(**HEDGE)
    assert config.hedge_after_s is not None
    async with _first_replica_stalled(tmp_path, "hedged") as (coordinator, stalled, key,
                                                              replicas, resume):
        try:
            with trio.fail_after(4 * config.request_timeout):
                started = trio.current_time()
                await coordinator.put(key, "first")
                took = trio.current_time() - started
            # not the 2 x request_timeout a forwarded write waits for its replica's answer
            assert took < config.hedge_after_s + config.request_timeout / 2, took
            assert coordinator.metrics["hedged_ops"] == 1
            # the stalled replica is passed over now: the next write goes to the next replica
            # at once, with no hedge delay; it was made after the first was acknowledged
            with trio.fail_after(4 * config.request_timeout):
                await coordinator.put(key, "second")
            assert coordinator.metrics["hedged_ops"] == 1
            assert coordinator.metrics["slow_marks"] == 1
            assert stalled.metrics["expired_ops"] == 0
        finally:
            resume.set()
        # the stalled replica gets to the first put late and must not apply it: stamped now,
        # it would overwrite the second, acknowledged later
        await wait_for(lambda: stalled.metrics["expired_ops"] == 1, 10,
                       "the late copy to be refused")
        await wait_for(lambda: all(held(kv, key) == "second" for kv in replicas), 15,
                       "every replica to hold the second write")
        assert await coordinator.get(key, consistency="all") == "second"
        assert coordinator.metrics["unknown_outcomes"] == 0


async def test_an_incr_whose_replica_is_stalled_has_an_unknown_outcome_and_counts_once(
        tmp_path):
    config = KVConfig(**HEDGE)
    async with _first_replica_stalled(tmp_path, "counted") as (coordinator, _stalled, key,
                                                               replicas, resume):
        try:
            with trio.fail_after(4 * config.request_timeout):
                with pytest.raises(OutcomeUnknown, match="may or may not have been applied"
                                   ) as unknown:
                    await coordinator.incr(key, 1)
            assert _classify(unknown.value) == (504, "outcome_unknown")
            assert coordinator.metrics["unknown_outcomes"] == 1
            assert coordinator.metrics["hedged_ops"] == 0  # never sent twice
        finally:
            resume.set()
        # the replica applies it once it goes on (an incr has no deadline), and only there
        await wait_for(lambda: all(held(kv, key) is not None for kv in replicas)
                       and len({kv.store.get(key.encode()) for kv in replicas}) == 1, 15,
                       "every replica to hold the same counter")
        assert [held(kv, key) for kv in replicas] == [1] * len(replicas)
        assert await coordinator.get(key, consistency="all") == 1


async def test_a_batch_waits_for_every_op_even_when_pushes_block_on_a_full_queue(tmp_path):
    # a slow replica (each batch takes a second) and queues of one: the coordinator's pushes
    # to it block (backpressure) while the other replica acks the first ops at once
    async with handles(tmp_path, 3, queue_per_peer=1, max_batch=1) as nodes:
        slow = nodes[2].kv
        merge = slow.writer.merge

        async def slowly_durable(items):
            await trio.sleep(1)
            await merge(items)

        slow.writer.merge = slowly_durable
        written = {f"b{i}": i for i in range(5)}
        with trio.fail_after(60):
            await nodes[0].kv.put_many(written, consistency="quorum")
        assert all(nodes[1].kv.store.get(k.encode()) is not None for k in written)


async def test_a_deleted_key_does_not_come_back_from_a_late_replica(tmp_path):
    async with handles(tmp_path, 4) as nodes:
        coordinator = nodes[0].kv
        await coordinator.put("ghost", "boo", consistency="all")
        owners = coordinator.ring.preference_list(b"ghost")
        late = next(n for n in nodes[1:] if n.kv.me in owners)
        late_id = late.kv.me
        await late.stop()  # it keeps the old value on disk
        await wait_for(lambda: late_id not in coordinator.net.view.alive_ids(), 15, "late down")
        await coordinator.delete("ghost")
        assert await coordinator.get("ghost") is None
        restarted = await late.start()
        assert restarted.store.get(b"ghost") is not None  # still the stale state
        await wait_for_ring([n.kv for n in nodes])

        def tombstoned():
            state = restarted.store.get(b"ghost")
            return state is not None and crdt.decode(state).deleted

        await wait_for(tombstoned, 30, "the late replica to learn the delete")
        for node in nodes:  # every replica holds the tombstone, every reader sees it deleted
            if node.kv.me in owners:
                assert crdt.decode(node.kv.store.get(b"ghost")).deleted
            assert await node.kv.get("ghost") is None


async def test_large_values_travel_in_byte_bounded_batches(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        big = {f"blob:{i}": "x" * 20_000 for i in range(300)}  # 6 MB: more than one frame
        await nodes[0].kv.put_many(big)
        assert await nodes[2].kv.get_many(sorted(big)) == ["x" * 20_000] * len(big)
        # nothing is left behind: a replica held suspect for a moment on a loaded machine
        # gets its share as hints, delivered within a few hint intervals; a batch too large
        # to send would stay a hint
        await wait_for(lambda: all(not n.kv.hints.pending() for n in nodes), 30,
                       "every hint delivered")
        with pytest.raises(OpError) as refused:
            await nodes[1].kv.put("huge", "y" * (2 * 1024 * 1024))
        assert refused.value.code == "too_large"
        with pytest.raises(OpError) as overflow:
            await nodes[1].kv.put("too-big-int", 2**70)
        assert overflow.value.code == "bad_value"


async def test_a_type_conflict_between_split_replicas_is_reported_not_fatal(tmp_path):
    async with handles(tmp_path, 2, replicas=2) as nodes:
        a, b = (n.kv for n in nodes)
        await a.net.isolate_from({b.me})
        await b.net.isolate_from({a.me})
        await wait_for(lambda: not a.net.view.alive_ids() and not b.net.view.alive_ids(), 15,
                       "the split")
        await a.put("clash", "a register", consistency="one")
        await b.sadd("clash", "a set member", consistency="one")
        a.net.heal()
        b.net.heal()
        await wait_for_ring([a, b])
        await wait_for(lambda: a.metrics["merge_failures"] + b.metrics["merge_failures"] > 0,
                       30, "anti-entropy to meet the conflict")
        value = await a.get("clash")  # one of the two, and both nodes keep serving
        assert value in ("a register", ["a set member"])
        assert a.metrics["type_conflicts"] >= 1
        await a.put("other", 1)
        assert await b.get("other") == 1


async def test_anti_entropy_puts_off_a_partition_being_written_but_not_for_long(tmp_path):
    interval, max_deferrals = 0.4, 2
    async with handles(tmp_path, N, anti_entropy_interval=interval,
                       anti_entropy_max_deferrals=max_deferrals) as nodes:
        kvs = [n.kv for n in nodes]
        hot = kvs[0].ring.partition_of(b"hot")
        stop_writing = trio.Event()

        async def keep_writing() -> None:
            while not stop_writing.is_set():
                await kvs[0].incr("hot")
                await trio.sleep(0.01)

        def deferred() -> int:
            return sum(kv.status()["anti_entropy"]["partitions_deferred"] for kv in kvs)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            await wait_for(lambda: deferred() > 0, 20, "a round to put the hot partition off")
            since = time.monotonic()
            # deferred at most max_deferrals rounds in a row: compared while still written
            await wait_for(lambda: any(kv.last_anti_entropy.get(hot, 0) > since for kv in kvs),
                           20, "the hot partition compared although it is still written")
            stop_writing.set()
        await wait_for(lambda: len({kv.store.get(b"hot") for kv in kvs}) == 1, 20,
                       "the replicas of the hot key to converge")
        await wait_for(lambda: deferred() == 0, 20, "nothing put off once the writes stop")


async def test_a_one_node_network_accepts_writes_and_handoff_brings_keys_up_to_n(tmp_path):
    async with handles(tmp_path, 1) as nodes:
        solo = nodes[0].kv
        assert solo.copies() == 1 and "1 of 3 copies" in solo.status()["warning"]
        for level in ("one", "quorum", "all"):
            await solo.put(f"k-{level}", level, consistency=level)
            assert await solo.get(f"k-{level}", consistency=level) == level
        await solo.put_many({f"bulk-{i}": i for i in range(50)})
        # a second node joins: every key gets its second copy there
        second = NodeHandle(nodes[0].nursery, tmp_path / "node1", [solo.net.addrs[0]])
        nodes.append(second)
        joined = await second.start()
        await wait_for_ring([solo, joined])
        assert solo.copies() == 2 and "2 of 3" in solo.status()["warning"]
        await wait_for(lambda: len(joined.store) == len(solo.store) == 53, 30,
                       "handoff of every key to the new node")
        assert await joined.get("k-all", consistency="all") == "all"


async def test_a_forwarded_ops_reply_with_a_malformed_outcome_fails_the_write_cleanly(tmp_path):
    # a replica answers a forwarded put with an outcome whose code is not a string: the
    # coordinator's write fails as a quorum failure naming the malformed reply (it raised
    # TypeError: unhashable type, where the code was looked up)
    async with handles(tmp_path, 4) as nodes:
        kvs = [n.kv for n in nodes]
        coordinator, mutator = kvs[0], kvs[1]
        key = key_forwarded_to(coordinator, mutator.me, "odd")

        async def odd(peer: str, message: object) -> object:
            return [[[["not", "a code"], "why"]]]

        mutator.net.handle(OPS_PROTOCOL, odd)
        with pytest.raises(QuorumError, match="malformed reply"):
            await coordinator.put(key, "v")


async def test_hints_a_peer_leaves_here_get_no_honest_node_scored_down(tmp_path):
    """A member leaves a node hints for another replica: one that is no CRDT state is refused
    at once (its sender scored down), not kept and delivered later, when the target would
    refuse it and score the honest node that delivers it; a sound state of another type than
    the target's is refused by the target without blame, and dropped from the hints."""
    async with handles(tmp_path, 4) as nodes:
        kvs = [n.kv for n in nodes]
        attacker = kvs[3]
        key = next(k for k in (f"k{i}".encode() for i in range(1000))
                   if attacker.me in attacker.ring.preference_list(k))
        target = next(kv for kv in kvs[:3] if kv.me in attacker.ring.preference_list(key))
        holder = next(kv for kv in kvs[:3] if kv is not target)
        await target.put(key, "register", consistency="all")
        register = target.store.get(key)
        assert register is not None

        def scores_of_holder() -> tuple[dict[str, int], float]:
            return (dict(target.net.scores.offences),
                    target.net.scores.score(holder.me, time.monotonic()))

        before = scores_of_holder()
        # not a state, although its first bytes are a register's (the cheap wall-time check
        # of kv-apply reads no further)
        garbage = register[:3] + b"\x05\xc1 not a register"
        with pytest.raises(RemoteError) as refused:
            await attacker.net.request(holder.me, APPLY_PROTOCOL, seal_batch(
                attacker.net, [[key, garbage, target.me]], attacker.next_batch_seq()))
        assert refused.value.code == "refused"
        assert holder.net.scores.score(attacker.me, time.monotonic()) < 0
        assert target.me not in holder.hints.pending()
        # a sound set state for a key the target holds as a register: the holder cannot know
        a_set = crdt.encode(crdt.ORSet().add_many(attacker.me, ("m",)))
        await attacker.net.request(holder.me, APPLY_PROTOCOL, seal_batch(
            attacker.net, [[key, a_set, target.me]], attacker.next_batch_seq()))
        await wait_for(lambda: target.me not in holder.hints.pending(), 15,
                       "the holder to try its hint and drop it")
        assert scores_of_holder() == before
        assert holder.metrics["hints_dropped"] == 1
        assert target.metrics["type_conflicts"] == 1
        assert target.store.get(key) == register
        assert await holder.get(key, consistency="all") == "register"


def _drainers(kv) -> Counter[str]:
    """The replication links' and forwarders' drainer tasks running in `kv`'s write room."""
    tasks = kv.writes._nursery.child_tasks
    return Counter(name for t in tasks for name in ("PeerLink.run", "Forwarder.run")
                   if t.name.endswith(name))


async def test_links_and_forwarders_to_a_member_that_left_the_ring_end(tmp_path):
    # a member that leaves takes its replication link and forwarder at every other node with
    # it (each a task and a queue: with fresh identities joining and leaving, they piled up);
    # what the others write afterwards still replicates
    async with handles(tmp_path, 3) as nodes, AsyncExitStack() as leaver_stack:
        a = nodes[0].kv
        leaver = await start_kv_node(leaver_stack, tmp_path / "leaver", [a.net.addrs[0]],
                                     net_overrides={"leave_on_stop": True})
        await wait_for_ring([n.kv for n in nodes] + [leaver])
        for i in range(30):  # some of these the leaver replicates: a links to it
            await a.put(f"k{i}", i)
        await a.put(key_forwarded_to(a, leaver.me, "fwd"), 1)  # a forwards to it
        assert leaver.me in a.writes.links and leaver.me in a.writes._forwarders
        before = _drainers(a)
        await leaver_stack.aclose()
        await wait_for(lambda: leaver.me not in a.ring.members, 15, "the leaver out of the ring")
        await wait_for(lambda: _drainers(a) == before - Counter(before.keys()), 10,
                       "the drainers to the leaver to end")
        assert leaver.me not in a.writes.links and leaver.me not in a.writes._forwarders
        await a.put("after", 1)
        assert await nodes[1].kv.get("after") == 1
