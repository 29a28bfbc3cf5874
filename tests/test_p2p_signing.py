# The libp2p pubsub signature on tasknet's gossip and the rolling upgrade to requiring it:
# every node signs what it publishes; gossip of a node of the previous release (unsigned) is
# accepted while accept_unsigned_gossip is on and refused, without blaming anyone, once it is
# off; a message whose signature is bad is refused and its sender scored as a forger.
from __future__ import annotations

import time
from contextlib import AsyncExitStack

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from p2p import Network
from p2p.envelope import seal
from p2p.identity import Identity
from p2p.pubsub_signing import signature_valid

from p2p_helpers import alive_ids, cluster, node_config, wait_for

NETWORK = "test-net"
TOPIC = "news"
FULL_TOPIC = f"/tasknet/{NETWORK}/{TOPIC}"


def in_mesh(net: Network, peer: str) -> bool:
    assert net._pubsub is not None
    return ID.from_base58(peer) in getattr(net._pubsub.router, "mesh", {}).get(FULL_TOPIC, ())


def signed_message(identity: Identity, data: bytes, seqno: int = 1) -> rpc_pb2.Message:
    """A message as SigningPubsub publishes it, signed by `identity`."""
    key = identity.key_pair().private_key
    msg = rpc_pb2.Message(data=data, topicIDs=[FULL_TOPIC], from_id=identity.peer_id.to_bytes(),
                          seqno=seqno.to_bytes(8, "big"))
    unsigned = b"libp2p-pubsub:" + msg.SerializeToString()
    msg.signature = key.sign(unsigned)
    msg.key = key.get_public_key().serialize()
    return msg


def test_signature_check():
    me, other = Identity.generate(), Identity.generate()
    good = signed_message(me, b"payload")
    assert signature_valid(good)
    tampered = rpc_pb2.Message()
    tampered.CopyFrom(good)
    tampered.data = b"payloaD"
    assert not signature_valid(tampered)
    foreign_key = rpc_pb2.Message()
    foreign_key.CopyFrom(good)
    foreign_key.key = other.key_pair().public_key.serialize()
    assert not signature_valid(foreign_key)  # the key must be the one of `from`
    for garbage in (b"\x00", b"\x08\x01\x12\x03abc"):
        broken = rpc_pb2.Message()
        broken.CopyFrom(good)
        broken.key = garbage
        assert not signature_valid(broken)
    no_key = rpc_pb2.Message()
    no_key.CopyFrom(good)
    no_key.ClearField("key")
    assert signature_valid(no_key)  # an Ed25519 peer id holds its key
    unsigned = rpc_pb2.Message()
    unsigned.CopyFrom(good)
    unsigned.ClearField("signature")
    assert not signature_valid(unsigned)


async def test_previous_release_gossip_accepted_only_while_configured(tmp_path):
    async with AsyncExitStack() as stack:
        old = await stack.enter_async_context(Network.start(node_config(tmp_path / "old")))
        assert old._pubsub is not None
        old._pubsub.sign_key = None  # the previous release publishes unsigned
        boot = [old.addrs[0]]
        new = await stack.enter_async_context(Network.start(
            node_config(tmp_path / "new", bootstrap=boot)))
        strict = await stack.enter_async_context(Network.start(
            node_config(tmp_path / "strict", bootstrap=boot, accept_unsigned_gossip=False)))
        new_sub = await stack.enter_async_context(new.subscribe(TOPIC))
        strict_sub = await stack.enter_async_context(strict.subscribe(TOPIC))
        await stack.enter_async_context(old.subscribe(TOPIC))
        await wait_for(lambda: in_mesh(new, old.peer_id) and in_mesh(strict, old.peer_id), 15,
                       "the old node in both meshes")

        await old.publish(TOPIC, "from the previous release")
        with trio.fail_after(10):
            got = await new_sub.next()
        assert (got.author, got.payload) == (old.peer_id, "from the previous release")
        await wait_for(lambda: strict.metrics["gossip_unsigned_refused"] >= 1, 10,
                       "the strict node to refuse the unsigned message")
        assert new.metrics["gossip_unsigned_refused"] == 0
        # nobody is blamed for it: honest nodes of the previous release send such gossip
        assert not strict.status()["offences"] and not new.status()["offences"]

        # signed gossip (a node of this release) reaches the strict node
        await new.publish(TOPIC, "signed")
        with trio.fail_after(10):
            got = await strict_sub.next()
        assert (got.author, got.payload) == (new.peer_id, "signed")
        assert strict_sub._receive.statistics().current_buffer_used == 0


async def test_bad_libp2p_signature_is_refused_and_scored(tmp_path):
    async with cluster(tmp_path, 2) as (victim, attacker):
        await wait_for(lambda: attacker.peer_id in alive_ids(victim), 15, "the attacker")
        async with victim.subscribe(TOPIC) as sub:
            assert attacker._pubsub is not None
            await wait_for(lambda: ID.from_base58(victim.peer_id) in
                           attacker._pubsub.peer_topics.get(FULL_TOPIC, ()), 15,
                           "the attacker to learn the victim's subscription")
            seq = 10**18
            for corrupt in ("signature", "key"):
                seq += 1
                msg = signed_message(attacker.identity,
                                     seal(attacker.identity, NETWORK, TOPIC, seq, corrupt), seq)
                if corrupt == "signature":
                    msg.signature = bytes([msg.signature[0] ^ 1]) + msg.signature[1:]
                else:
                    msg.key = Identity.generate().key_pair().public_key.serialize()
                # the attacker did not join the topic, so its own pubsub sends it unchecked
                await attacker._pubsub.push_msg(attacker._pubsub.my_id, msg)
            await wait_for(lambda: victim.status()["offences"].get("forged", 0) >= 2, 10,
                           "the victim to score both forged messages")
            assert victim.scores.score(attacker.peer_id, time.monotonic()) <= -99
            assert victim.metrics["gossip_rejected"] >= 2
            # the envelopes were fine: only the libp2p signature refused them
            assert sub._receive.statistics().current_buffer_used == 0
