# Size limits and replay protection on the store's peer-facing paths, tried by a real
# attacker peer (a node of the cluster, with its own libp2p identity, sending what an honest
# node never would) on 127.0.0.1: oversized ops forwarded over kv-ops, the largest accepted
# write travelling through replication and hints, hints that can never be delivered, and
# replayed or stale kv-apply batches, malformed requests on each store protocol. Also the
# sans-IO replay guard on its own.
import time
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio

import crdt
from kv import KV, KVConfig, OpError, repair
from kv.forwarding import OPS_PROTOCOL
from kv.ops import MAX_MEMBERS_PER_OP, Op, make_delta
from kv.replication import APPLY_PROTOCOL, Delta, seal_batch
from p2p import ConfigError, Network, RemoteError
from p2p.envelope import TIMED_REPLAY_WINDOW_US, EnvelopeError, TimedReplayGuard
from shard import Initiator

from kv_helpers import handles, wait_for, wait_for_ring
from p2p_helpers import node_config

MiB = 1024 * 1024


def _score(kv: KV, peer: str) -> float:
    return kv.net.scores.score(peer, time.monotonic())


async def test_oversized_ops_forwarded_by_a_peer_are_refused_and_the_peer_penalized(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        victim, attacker = nodes[0].kv, nodes[1].kv
        big_value = b"v" * (3 * MiB // 2)
        long_key = b"k" * 100_000
        ops = [["put", b"big-value", [big_value]], ["put", long_key, [1]],
               ["put", b"fine", [1]]]
        replies = await attacker.net.request(victim.me, OPS_PROTOCOL,
                                             {"groups": [{"c": "one", "ops": ops}]})
        (group,) = replies
        assert group[0][0] == "too_large" and f"{len(big_value) + 6} bytes" in group[0][1]
        assert group[1][0] == "too_large" and "key of 100000 bytes" in group[1][1]
        assert group[2] is None  # the op within the limits is applied
        assert victim.metrics["refused_ops"] == 2
        assert _score(victim, attacker.me) < 0
        assert victim.net.scores.offences.get("oversized") == 1
        for node in nodes:
            assert node.kv.store.get(b"big-value") is None
            assert node.kv.store.get(long_key) is None
        assert await victim.get("fine") == 1
        # an honest coordinator refuses the same ops itself, with the same error
        for key, value in ((b"big-value", big_value), (long_key, 1)):
            with pytest.raises(OpError) as refused:
                await attacker.put(key, value)
            assert refused.value.code == "too_large"


MALFORMED = [  # (protocol, a request no honest node sends)
    ("kv-ops", {"groups": "all of them"}),
    ("kv-ops", {"groups": [{"ops": [["put", b"k", [1]]], "by": "soon"}]}),
    ("kv-ops", {"groups": [{"ops": [["frobnicate", b"k", []]]}]}),
    ("kv-read", {"keys": ["not bytes"]}),
    ("kv-roots", {"p": [-1]}),
    ("kv-ae", {"m": []}),
]


async def test_malformed_requests_on_every_store_protocol_score_their_sender_down(tmp_path):
    # each refused with bad_request and counted against the sender as malformed; the store
    # serves an honest read afterwards
    async with handles(tmp_path, 3) as nodes:
        victim, attacker = nodes[0].kv, nodes[1].kv
        await victim.put("kept", 7)
        for protocol, request in MALFORMED:
            with pytest.raises(RemoteError) as refused:
                await attacker.net.request(victim.me, protocol, request)
            assert refused.value.code == "bad_request", (protocol, refused.value)
        assert victim.net.scores.offences.get("malformed") == len(MALFORMED)
        assert _score(victim, attacker.me) < 0
        assert await nodes[2].kv.get("kept") == 7


async def test_ops_naming_more_members_than_the_cap_are_refused_from_a_peer_too(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        victim, attacker = nodes[0].kv, nodes[1].kv
        over = list(range(MAX_MEMBERS_PER_OP + 1))
        ops = [["sadd", b"tags", over], ["srem", b"tags", over],
               ["sadd", b"tags", list(range(MAX_MEMBERS_PER_OP))]]
        replies = await attacker.net.request(victim.me, OPS_PROTOCOL,
                                             {"groups": [{"c": "one", "ops": ops}]})
        (group,) = replies
        for refused_op in group[:2]:
            assert refused_op[0] == "too_large" and f"limit {MAX_MEMBERS_PER_OP}" in refused_op[1]
        assert group[2] is None  # at the cap: applied
        assert victim.metrics["refused_ops"] == 2
        assert victim.net.scores.offences.get("oversized") == 1 and _score(victim, attacker.me) < 0
        assert len(await victim.get("tags")) == MAX_MEMBERS_PER_OP
        # an honest coordinator refuses them itself, with the same error
        for refused_call in (attacker.sadd, attacker.srem):
            with pytest.raises(OpError) as refused:
                await refused_call("tags", *over)
            assert refused.value.code == "too_large"


async def test_limits_that_could_not_replicate_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_batch_bytes"):
        KVConfig(max_value_bytes=4 * MiB)
    KVConfig(max_value_bytes=3 * MiB, max_batch_bytes=3 * MiB + 4096)  # consistent: fine
    async with AsyncExitStack() as stack:
        net = await stack.enter_async_context(
            Network.start(node_config(tmp_path / "small-frames", max_frame_size=MiB)))
        with pytest.raises(ConfigError, match="max_frame_size"):
            await stack.enter_async_context(KV.start(net, tmp_path / "small-frames", KVConfig()))


async def test_writes_that_would_outgrow_a_replication_item_are_refused(tmp_path):
    async with handles(tmp_path, 2, replicas=2, max_value_bytes=8192,
                       max_batch_bytes=16384) as nodes:
        kv = nodes[0].kv
        # small arguments, a large delta: every member of a set carries a dot
        with pytest.raises(OpError) as refused:
            await kv.sadd("tags", *range(400))
        assert refused.value.code == "too_large" and "change" in str(refused.value)
        # each write within the limits, but the state they leave would not be
        for field in ("a", "b"):
            await kv.hset("profile", field, "x" * 7000)
        with pytest.raises(OpError) as grown:
            await kv.hset("profile", "c", "x" * 7000)
        assert grown.value.code == "too_large" and "grow" in str(grown.value)
        await kv.hdel("profile", "a")  # removals always pass; then there is room again
        await kv.hset("profile", "c", "x" * 7000)
        assert sorted(await nodes[1].kv.get("profile")) == ["b", "c"]


def _largest_value(config: KVConfig, fill: str) -> str:
    """The largest string a put accepts: its encoded arguments are exactly max_value_bytes."""
    value = fill * (config.max_value_bytes - 6)  # array header 1 + str32 header 5
    assert len(msgpack.packb((value,), use_bin_type=True)) == config.max_value_bytes
    return value


async def test_the_largest_accepted_write_replicates_directly_and_through_hints(tmp_path):
    # no anti-entropy during the test: the late replica must get the write from the hint
    async with handles(tmp_path, 3, anti_entropy_interval=3600.0) as nodes:
        coordinator = nodes[0].kv
        config = coordinator.config
        with pytest.raises(OpError) as refused:
            await coordinator.put("a", _largest_value(config, "x") + "x")
        assert refused.value.code == "too_large"
        direct_key = "d" * config.max_key_bytes
        direct = _largest_value(config, "d")
        await coordinator.put(direct_key, direct, consistency="all")
        for node in nodes:
            assert crdt.decode(node.kv.store.get(direct_key.encode())).value() == direct
        late = nodes[2]
        late_id = late.kv.me
        await late.stop()
        await wait_for(lambda: late_id not in coordinator.net.view.alive_ids(), 20,
                       "the stopped replica no longer alive")
        hinted_key = "h" * config.max_key_bytes
        hinted = _largest_value(config, "h")
        await coordinator.put(hinted_key, hinted)  # quorum: two of three, one hint
        await wait_for(lambda: any(n.kv.hints.pending() for n in nodes if n.kv), 10,
                       "a hint for the stopped replica")
        restarted = await late.start()
        await wait_for_ring([n.kv for n in nodes if n.kv is not None])
        await wait_for(lambda: restarted.store.get(hinted_key.encode()) is not None, 30,
                       "the hinted write to reach the restarted replica")
        assert crdt.decode(restarted.store.get(hinted_key.encode())).value() == hinted
        # the holder counts the hint once the replica's answer is back
        await wait_for(lambda: sum(n.kv.metrics["hints_delivered"] for n in nodes if n.kv) >= 1,
                       10, "the hint counted as delivered")
        assert all(n.kv.metrics["hints_dropped"] == 0 for n in nodes if n.kv)


async def test_a_hint_that_can_never_be_delivered_does_not_block_the_ones_behind_it(tmp_path):
    async with handles(tmp_path, 2, replicas=2) as nodes:
        holder, target = nodes[0].kv, nodes[1].kv
        frame = holder.net.config.max_frame_size
        now_ms = time.time_ns() // 1_000_000
        keys = [f"after-{i}".encode() for i in range(50)]
        later = [(key, crdt.encode(make_delta(Op("put", key, (i,)), None, holder.me,
                                              crdt.HLC(), now_ms)))
                 for i, key in enumerate(keys)]
        # no await between these: the hint loop sees all three at once, bad ones first
        holder.hints.add(target.me, [(b"garbage", b"\xc1 not a CRDT state")])  # refused
        holder.hints.add(target.me, [(b"huge", b"x" * (frame + 1))])  # never fits a frame
        holder.hints.add(target.me, later)
        await wait_for(lambda: all(target.store.get(k) is not None for k in keys), 20,
                       "the hints behind the bad ones delivered")
        await wait_for(lambda: not holder.hints.pending(), 10, "no hint left")
        assert holder.metrics["hints_dropped"] == 2
        assert target.store.get(b"garbage") is None and target.store.get(b"huge") is None
        # a state too large for any frame queued for replication is dropped, not hinted
        holder.writes.link(target.me).push_nowait(Delta(b"huge-state", b"y" * (frame + 1), None,
                                                  None))
        await holder.put("behind-it", 1, consistency="all")
        await wait_for(lambda: holder.status()["metrics"]["oversized_dropped"] == 1, 10,
                       "the oversized replication item dropped")
        assert not holder.hints.pending()
        assert target.store.get(b"behind-it") is not None


async def test_replayed_and_stale_replication_batches_are_refused(tmp_path, monkeypatch):
    async with handles(tmp_path, 2, replicas=2) as nodes:
        victim, sender = nodes[0].kv, nodes[1].kv
        captured: list[bytes] = []
        real_request = sender.net.request

        async def capturing(peer, protocol, message, **kwargs):
            if protocol == APPLY_PROTOCOL and peer == victim.me:
                captured.append(message)
            return await real_request(peer, protocol, message, **kwargs)

        monkeypatch.setattr(sender.net, "request", capturing)
        await sender.put("replayed", "once", consistency="all")  # the sender applies it
        assert captured and victim.store.get(b"replayed") is not None  # the first: accepted
        assert victim.status()["metrics"]["replayed_batches"] == 0
        with pytest.raises(RemoteError) as replay:
            await real_request(victim.me, APPLY_PROTOCOL, captured[0])
        assert replay.value.code == "refused" and "already seen" in replay.value.message
        assert victim.status()["metrics"]["replayed_batches"] == 1
        assert victim.net.scores.offences.get("replayed") == 1
        key = b"stale"
        item = [[key, crdt.encode(make_delta(Op("put", key, (1,)), None, sender.me,
                                             crdt.HLC(), time.time_ns() // 1_000_000)), None]]
        now_us = sender.next_batch_seq()
        for seq in (now_us - TIMED_REPLAY_WINDOW_US - 10**6, 42,  # too old, an old release's
                    now_us + TIMED_REPLAY_WINDOW_US + 10**6):  # and too far ahead
            with pytest.raises(RemoteError) as stale:
                await real_request(victim.me, APPLY_PROTOCOL, seal_batch(sender.net, item, seq))
            assert stale.value.code == "refused" and "replay window" in stale.value.message
        assert victim.status()["metrics"]["replayed_batches"] == 4
        assert victim.store.get(key) is None
        assert _score(victim, sender.me) < 0
        # batches in flight together arrive in any order and are all taken, once each
        seqs = [sender.next_batch_seq() for _ in range(3)]
        for seq in (seqs[2], seqs[0], seqs[1]):
            assert await real_request(victim.me, APPLY_PROTOCOL,
                                      seal_batch(sender.net, item, seq)) == 1
        assert victim.store.get(key) is not None


def test_timed_replay_guard_remembers_a_bounded_window():
    window = 1000
    guard = TimedReplayGuard(window_us=window, per_author=3, max_authors=2)
    now = 10**6
    for seq in (now, now - 5, now + 5):
        guard.check_and_record(b"a", seq, now)
    with pytest.raises(EnvelopeError, match="already seen"):
        guard.check_and_record(b"a", now - 5, now)
    guard.check_and_record(b"a", now + 6, now)  # past per_author: the smallest is forgotten
    with pytest.raises(EnvelopeError, match="already seen"):  # ... and refused below it
        guard.check_and_record(b"a", now - 7, now)
    later = now + 5 * window  # everything remembered is now outside the window
    guard.check_and_record(b"a", later, later)
    assert len(guard._authors[b"a"].seen) == 1
    with pytest.raises(EnvelopeError, match="replay window"):
        guard.check_and_record(b"a", now, later)
    guard.check_and_record(b"b", later, later)
    guard.check_and_record(b"c", later, later)  # at most two authors: "a" is forgotten
    assert set(guard._authors) == {b"b", b"c"}
    assert guard.refused == 3


async def test_anti_entropy_sessions_left_idle_are_forgotten(tmp_path, monkeypatch):
    # a peer that sent the first step of an anti-entropy session and went away kept it (a
    # snapshot of the tree) for the life of the process: up to 4 per peer ever met, so a fresh
    # member identity per connection (anyone, under the open rule) grew the table unbounded
    monkeypatch.setattr(repair, "AE_SESSION_IDLE_S", 0.5)
    async with handles(tmp_path, 2, anti_entropy_interval=3600.0) as nodes:
        victim, peer = nodes[0].kv, nodes[1].kv
        await peer.put("differs", 1)  # so that the first step leaves the session open

        def first_step() -> object:
            hi = Initiator(peer.store.tree, peer.repair.offered_segment).start()
            return {**hi, "h": bytes(b ^ 1 for b in hi["h"])}  # hashes that differ

        for sid in range(1, 5):
            assert await peer.net.request(victim.me, repair.AE_PROTOCOL,
                                          {"sid": sid, "m": first_step()}) is not None
        sessions = victim.repair._ae_sessions
        assert sorted(sid for _, sid in sessions) == [1, 2, 3, 4]
        await trio.sleep(0.6)  # the peer gives up: nothing comes for longer than the idle bound
        await peer.net.request(victim.me, repair.AE_PROTOCOL, {"sid": 5, "m": first_step()})
        assert sorted(sid for _, sid in sessions) == [5]
