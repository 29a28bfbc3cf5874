# A misbehaving peer sends forged, oversized, truncated and random data, over gossip, over
# request streams and as raw bytes on the TCP port. The victim refuses it, scores the sender
# down, stays up and keeps serving honest peers.
import dataclasses
import os
import socket
import time

import msgpack
import trio
from libp2p.peer.id import ID

from p2p import Network, network, swim
from p2p.admission import AdmissionRule
from p2p.envelope import seal
from p2p.framing import encode_frame
from p2p.identity import Identity, load_or_create_identity
from p2p.rpc import protocol_id
from p2p.swim_net import RecordSigner

from p2p_helpers import alive_ids, cluster, free_port, node_config, wait_for


async def test_bad_gossip_is_refused_and_penalised(tmp_path):
    async with cluster(tmp_path, 3, max_gossip_size=4096) as (victim, honest, attacker):
        everyone = {victim.peer_id, honest.peer_id, attacker.peer_id}
        await wait_for(lambda: alive_ids(victim) == everyone, 15, "all three members")
        topic = "/tasknet/test-net/news"
        good = seal(attacker.identity, "test-net", "news", 10**18, {"ok": 1})
        version, body, sig = msgpack.unpackb(good)
        stranger = Identity.generate()
        bad_messages = [
            os.urandom(64),  # random bytes
            good[: len(good) // 2],  # truncated
            msgpack.packb([version, body.replace(b"ok", b"no"), sig]),  # forged body
            seal(stranger, "test-net", "news", 1, "claims another author"),  # author mismatch
            seal(attacker.identity, "test-net", "news", 2, "x" * 8000),  # oversized
            msgpack.packb([99, body, sig]),  # unknown protocol version
            seal(attacker.identity, "other-net", "news", 3, "wrong network"),
        ]
        async with victim.subscribe("news") as sub:
            await trio.sleep(1.2)  # let the topic mesh form (one gossipsub heartbeat)
            for data in bad_messages:
                await attacker._pubsub.publish(topic, data)
            # each offence lowers the attacker's score; before the list is through it is
            # banned: blacklisted in pubsub and disconnected
            await wait_for(lambda: victim.scores.is_banned(attacker.peer_id, time.monotonic()),
                           10, "the attacker to be banned")
            await wait_for(lambda: attacker.peer_id not in victim.connected_peers(), 10,
                           "the victim to drop the attacker")
            assert victim.metrics["gossip_rejected"] >= 3
            assert set(victim.status()["offences"]) >= {"malformed", "forged"}
            # the victim still delivers honest traffic
            with trio.fail_after(10):
                while True:
                    await honest.publish("news", "honest")
                    with trio.move_on_after(0.5):
                        msg = await sub.next()
                        if msg.payload == "honest":
                            assert msg.author == honest.peer_id
                            break
        assert alive_ids(honest) >= {victim.peer_id}


async def test_replayed_gossip_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "REPLAYS_ALLOWED", 3)
    async with cluster(tmp_path, 2) as (victim, attacker):
        await wait_for(lambda: attacker.peer_id in alive_ids(victim), 15, "attacker to join")
        topic = "/tasknet/test-net/news"
        async with victim.subscribe("news") as sub:
            await trio.sleep(1.2)
            data = seal(attacker.identity, "test-net", "news", 10**18, "once")
            await attacker._pubsub.publish(topic, data)
            with trio.fail_after(5):
                first = await sub.next()
            assert first.payload == "once"
            before = victim.metrics["gossip_rejected"]
            await attacker._pubsub.publish(topic, data)  # same envelope, new pubsub seqno
            await wait_for(lambda: victim.metrics["gossip_rejected"] > before, 5,
                           "the replay to be refused")
            assert victim.metrics["gossip_replayed"] >= 1  # counted, but not as a fault
            assert victim.scores.score(attacker.peer_id, time.monotonic()) >= 0
            with trio.move_on_after(0.5):
                await sub.next()
                raise AssertionError("a replayed envelope was delivered twice")
            # past its allowance a forwarder of replays is held to account
            for _ in range(3):
                await attacker._pubsub.publish(topic, data)
            await wait_for(lambda: victim.scores.score(attacker.peer_id, time.monotonic()) < 0,
                           5, "the replays past the allowance to count against the sender")
            assert victim.metrics["gossip_replayed"] >= 4


async def _raw_stream(attacker, victim, name):
    return await attacker.host.new_stream(ID.from_base58(victim.peer_id),
                                          [protocol_id("test-net", name, 1)])


async def test_bad_frames_are_refused_and_honest_requests_still_served(tmp_path):
    async with cluster(tmp_path, 3, max_frame_size=1024) as (victim, honest, attacker):
        async def echo(peer, msg):
            return msg

        victim.handle("echo", echo)
        everyone = {victim.peer_id, honest.peer_id, attacker.peer_id}
        await wait_for(lambda: alive_ids(victim) == everyone, 15, "all three members")

        sends = [
            (10_000_000).to_bytes(4, "big"),  # announces an oversized frame
            (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
            os.urandom(300),  # random bytes
        ]
        for data in sends:
            stream = await _raw_stream(attacker, victim, "echo")
            await stream.write(data)
            with trio.move_on_after(5):
                try:
                    reply = await stream.read(100)
                    assert reply == b"", "a bad frame must not get a reply"
                except Exception:
                    pass  # the victim reset the stream: expected
        # truncated frame, then the attacker goes away
        stream = await _raw_stream(attacker, victim, "echo")
        await stream.write((50).to_bytes(4, "big") + b"\x92\x01")
        await stream.close()

        await wait_for(lambda: victim.status()["offences"].get("frame", 0) >= 3, 10,
                       "frame offences recorded")
        assert await honest.request(victim.peer_id, "echo", {"n": 1}) == {"n": 1}

        # garbage straight on the TCP port
        port = int(victim.addrs[0].split("/tcp/")[1].split("/")[0])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(os.urandom(2048))
        assert await honest.request(victim.peer_id, "echo", [1, 2, 3]) == [1, 2, 3]
        assert alive_ids(honest) >= {victim.peer_id}


async def test_a_negative_request_id_other_than_no_reply_is_a_bad_frame(tmp_path):
    async with cluster(tmp_path, 2) as (victim, attacker):
        heard: list[object] = []

        async def echo(peer, msg):
            heard.append(msg)
            return msg

        victim.handle("echo", echo)
        await wait_for(lambda: victim.peer_id in attacker.connected_peers(), 10, "a connection")
        stream = await _raw_stream(attacker, victim, "echo")
        await stream.write(encode_frame([-2, "not a request"], 1024))
        await wait_for(lambda: victim.status()["offences"].get("frame", 0) >= 1, 10,
                       "the frame offence recorded")
        assert heard == []
        assert await attacker.request(victim.peer_id, "echo", "fine") == "fine"


async def test_a_member_record_with_addresses_that_do_not_parse_does_not_stop_the_node(
        tmp_path):
    # a record is signed by its own member, who may write anything in its addresses: one
    # SWIM message about a fresh identity whose record holds garbage made every node that
    # heard it raise in its discovery loop, when it went to dial that member, and stop
    async with cluster(tmp_path, 2) as (victim, attacker):
        async def echo(peer, msg):
            return msg

        victim.handle("echo", echo)
        await wait_for(lambda: attacker.peer_id in alive_ids(victim), 15, "the attacker to join")
        sybil = Identity.generate()
        sybil_id = str(sybil.peer_id)
        nowhere = f"/ip4/127.0.0.1/tcp/{free_port()}"  # parses, but nobody listens there
        record = RecordSigner(sybil, "test-net").sign(
            swim.RecordInfo(sybil_id, 1, ("not a multiaddr", "/ip4/999.1.1.1/tcp/1", nowhere),
                            b"", 1))
        dials = victim.metrics["dials"]
        news = swim.Gossip(300, (swim.Update(sybil_id, 1, swim.ALIVE, record, None),))
        await attacker.notify(victim.peer_id, "swim", swim.encode(news))
        await wait_for(lambda: victim.view.get(sybil_id) is not None, 10,
                       "the victim to learn of the sybil")
        # the discovery loop went past the sybil's record: it dialled the address that parses
        await wait_for(lambda: victim.metrics["dials"] > dials, 10, "a dial of the sybil")
        assert await attacker.request(victim.peer_id, "echo", "still up") == "still up"


async def test_a_peer_whose_streams_ended_leaves_no_request_slots_behind(tmp_path):
    # the request slots of each peer served were kept for the life of the process: a fresh
    # identity per connection grew the table without bound
    async with cluster(tmp_path, 2) as (victim, attacker):
        async def echo(peer, msg):
            return msg

        victim.handle("echo", echo)
        await wait_for(lambda: victim.peer_id in attacker.connected_peers(), 10, "a connection")

        async def silent(output):  # the attacker's membership messages would hold a stream
            pass

        attacker._swim._send = silent
        slots = victim._rpc._peer_slots
        for round_ in range(3):
            assert await attacker.request(victim.peer_id, "echo", round_) == round_
            assert attacker.peer_id in slots  # held while its stream is served
            attacker._rpc.forget_peer(victim.peer_id)  # resets the stream: the victim's ends
            await wait_for(lambda: attacker.peer_id not in slots, 10,
                           "the attacker's request slots to go with its last stream")


async def test_strangers_that_left_are_not_kept_on_the_gossip_blacklist(tmp_path):
    # under members-only gossip every peer the rule does not admit is put on pubsub's
    # blacklist when it connects; it was never taken off, so a fresh identity per connection
    # grew the list (walked every second) without bound
    me = str(load_or_create_identity(tmp_path / "victim").peer_id)
    rule = AdmissionRule(kind="allowlist", peers=frozenset({me}))
    async with Network.start(node_config(tmp_path / "victim", admission=rule)) as victim:
        pubsub = victim._pubsub
        assert pubsub is not None
        for round_ in range(3):
            config = node_config(tmp_path / f"stranger-{round_}", admission=rule,
                                 bootstrap=[victim.addrs[0]])
            async with Network.start(config) as stranger:  # a fresh identity each time
                listed = ID.from_base58(stranger.peer_id)
                await wait_for(lambda listed=listed: pubsub.is_peer_blacklisted(listed), 10,
                               "the stranger kept out of gossip while connected")
            await wait_for(lambda listed=listed: not pubsub.is_peer_blacklisted(listed), 10,
                           "the stranger off the blacklist once it has gone")
        assert pubsub.get_blacklisted_peers() == set()


async def test_streams_to_a_stranger_go_with_its_last_connection(tmp_path):
    # a SWIM ping from a peer this node does not know is answered on a stream this node
    # opens to it; that stream stayed in the request table for the life of the process
    # (only a member's went, once held dead), one per fresh identity that pinged once
    async with Network.start(node_config(tmp_path / "victim")) as victim:
        channels = victim._rpc._channels
        for round_ in range(3):
            config = node_config(tmp_path / f"stranger-{round_}", bootstrap=[victim.addrs[0]])
            async with Network.start(config) as stranger:
                async def silent(output):  # never announces itself: stays a stranger
                    pass

                stranger._swim._send = silent
                await wait_for(lambda: victim.peer_id in stranger.connected_peers(), 10,
                               "a connection")
                ping = swim.encode(swim.Ping(300, ()))
                await stranger.notify(victim.peer_id, "swim", ping)
                await wait_for(lambda: any(k[0] == stranger.peer_id for k in channels), 10,
                               "the victim to answer on a stream of its own")
                gone = stranger.peer_id
            await wait_for(lambda gone=gone: not any(k[0] == gone for k in channels), 10,
                           "the streams to the stranger to go with its connection")
            assert victim.view.get(gone) is None


async def test_a_forgotten_member_leaves_no_redial_backoff_behind(tmp_path, monkeypatch):
    # anyone may sign a member record for a fresh identity at an address where nobody
    # listens: the victim dials it in vain, then holds it dead and forgets it, but kept its
    # redial backoff for the life of the process
    quick = network.swim_config
    monkeypatch.setattr(network, "swim_config",
                        lambda config: dataclasses.replace(quick(config), forget_after=1.0))
    async with cluster(tmp_path, 2) as (victim, attacker):
        await wait_for(lambda: attacker.peer_id in alive_ids(victim), 15, "the attacker to join")
        for _ in range(3):
            sybil = Identity.generate()
            sybil_id = str(sybil.peer_id)
            nowhere = f"/ip4/127.0.0.1/tcp/{free_port()}"
            record = RecordSigner(sybil, "test-net").sign(
                swim.RecordInfo(sybil_id, 1, (nowhere,), b"", 1))
            news = swim.Gossip(300, (swim.Update(sybil_id, 1, swim.ALIVE, record, None),))
            await attacker.notify(victim.peer_id, "swim", swim.encode(news))
            await wait_for(lambda sybil_id=sybil_id: sybil_id in victim._redial_at, 10,
                           "a failed dial of the sybil")
            await wait_for(lambda sybil_id=sybil_id: victim.view.get(sybil_id) is None, 30,
                           "the sybil held dead and forgotten")
            await wait_for(lambda sybil_id=sybil_id: sybil_id not in victim._redial_at, 5,
                           "the sybil's redial backoff to go with it")
        assert attacker.peer_id in alive_ids(victim)
