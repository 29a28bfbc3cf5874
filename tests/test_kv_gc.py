# System tests of tombstone collection and hint expiry: real nodes (libp2p on 127.0.0.1,
# LevelDB dirs), a short grace period.
from __future__ import annotations

import crdt
from kv.tombstones import deleted_at

from kv_helpers import handles, stored_keys, wait_for, wait_for_ring

GC = {"tombstone_grace_s": 1.0, "hint_ttl_s": 1.0, "tombstone_sweep_interval": 0.2,
      "tombstone_settle_s": 1.0}


def is_tombstone(state: bytes | None) -> bool:
    return state is not None and deleted_at(state) is not None


async def test_a_confirmed_tombstone_is_collected_on_every_replica(tmp_path):
    async with handles(tmp_path, 3, **GC) as nodes:
        a, b, c = (n.kv for n in nodes)
        await a.put_many({"gone": 1, "kept": 2}, consistency="all")
        await b.delete("gone", consistency="all")
        assert all(is_tombstone(kv.store.get(b"gone")) for kv in (a, b, c))
        await wait_for(lambda: all(kv.store.get(b"gone") is None for kv in (a, b, c)), 20,
                       "the tombstone to be collected on every replica")
        assert sum(kv.metrics["tombstones_collected"] for kv in (a, b, c)) >= 3
        assert await c.get("gone") is None
        assert await a.get("kept") == 2
        assert all(crdt.decode(kv.store.get(b"kept")).value() == 2 for kv in (a, b, c))


async def test_a_replica_that_missed_the_delete_cannot_bring_the_key_back(tmp_path):
    async with handles(tmp_path, 3, **GC) as nodes:
        a, b = nodes[0].kv, nodes[1].kv
        late = nodes[2]
        await a.put("doc", "old", consistency="all")
        late_id = late.kv.me
        await late.stop()
        await wait_for(lambda: all(late_id not in kv.net.view.alive_ids() for kv in (a, b)), 15,
                       "the others to see the replica down")
        await a.delete("doc")  # quorum: the late replica misses it
        # well past the grace period, with sweep rounds running: nothing is collected while a
        # replica is down, and its hint expires
        rounds = a.sweeper.rounds + b.sweeper.rounds
        await wait_for(lambda: a.sweeper.rounds + b.sweeper.rounds >= rounds + 20
                       and sum(kv.metrics["hints_expired"] for kv in (a, b)) >= 1, 15,
                       "sweep rounds past the grace and the hint for the late replica expired")
        assert all(is_tombstone(kv.store.get(b"doc")) for kv in (a, b))
        assert a.metrics["tombstones_collected"] + b.metrics["tombstones_collected"] == 0
        held = stored_keys(late.data_dir)[b"doc"]
        assert crdt.decode(held).value() == "old"  # it comes back with the value it had
        await late.start()
        kvs = [n.kv for n in nodes]
        await wait_for_ring(kvs)
        assert [await kv.get("doc") for kv in kvs] == [None] * 3
        await wait_for(lambda: all(kv.store.get(b"doc") is None for kv in kvs), 20,
                       "the tombstone to be collected everywhere once every replica has it")
        assert [await kv.get("doc") for kv in kvs] == [None] * 3


async def test_an_old_owner_still_handing_off_blocks_collection(tmp_path):
    async with handles(tmp_path, 4, **GC) as nodes:
        kvs = [n.kv for n in nodes]
        await kvs[0].put("doc", "old", consistency="all")
        # the one node that is not a replica of "doc" holds its old value as foreign data
        # (an old owner whose handoff keeps failing), then the key is deleted
        replicas = set(kvs[0].ring.preference_list(b"doc"))
        (old_owner,) = [kv for kv in kvs if kv.me not in replicas]
        owners = [kv for kv in kvs if kv.me in replicas]
        old_state = owners[0].store.get(b"doc")
        assert old_state is not None
        hand_off = old_owner.handoff._hand_off_foreign

        async def failing_handoff(alive):
            return None

        old_owner.handoff._hand_off_foreign = failing_handoff
        await old_owner.writer.merge([(b"doc", old_state)])
        await kvs[0].delete("doc", consistency="all")
        rounds = sum(kv.sweeper.rounds for kv in owners)
        await wait_for(lambda: sum(kv.sweeper.rounds for kv in owners) >= rounds + 30, 20,
                       "sweep rounds well past the grace")
        assert all(is_tombstone(kv.store.get(b"doc")) for kv in owners)
        assert sum(kv.metrics["tombstones_collected"] for kv in owners) == 0
        # the handoff goes through: the old value meets the tombstone and loses, then the
        # tombstone is collected and the key stays deleted
        old_owner.handoff._hand_off_foreign = hand_off
        await wait_for(lambda: old_owner.store.get(b"doc") is None
                       and all(kv.store.get(b"doc") is None for kv in owners), 30,
                       "the handoff, then the collection")
        assert [await kv.get("doc") for kv in kvs] == [None] * 4
