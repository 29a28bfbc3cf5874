# libp2p pubsub message signatures (the `signature` and `key` fields of a gossip message, over
# "libp2p-pubsub:" + the message's from, data, seqno and topics): signing every message this
# node publishes, and checking the signature of a received one.
# Why not py-libp2p's own: its `strict_signing` ties signing what a node publishes to dropping
# every unsigned message it receives (before any topic validator sees it). Other libp2p
# implementations drop unsigned messages that carry from and seqno (js-libp2p's GossipSub in
# either signature policy), so tasknet signs always; it requires signatures only once every
# node of a network signs (NetworkConfig.accept_unsigned_gossip, checked in Network._validate).
# Must not live here: tasknet's own envelopes (p2p/envelope.py) or any scoring.
from __future__ import annotations

from typing import Any

from libp2p.abc import IHost, IPubsubRouter
from libp2p.crypto.keys import PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

_PREFIX = PUBSUB_SIGNING_PREFIX.encode()


def _signed_bytes(msg: rpc_pb2.Message) -> bytes:
    """What the signature of `msg` covers: the prefix and the message without signature and key."""
    unsigned = rpc_pb2.Message(data=msg.data, topicIDs=msg.topicIDs, from_id=msg.from_id,
                               seqno=msg.seqno)
    return _PREFIX + unsigned.SerializeToString()


def is_signed(msg: rpc_pb2.Message) -> bool:
    """Whether `msg` claims a libp2p signature (a signature or a key field)."""
    return bool(msg.signature or msg.key)


def signature_valid(msg: rpc_pb2.Message) -> bool:
    """Whether `msg` carries a valid libp2p pubsub signature of its `from` peer: the key is
    the one in `key` when that is present (it must belong to `from`), else the one the peer
    id embeds. Never raises on what a peer sent."""
    if not msg.signature or not msg.from_id:
        return False
    try:
        sender = ID(msg.from_id)
        key: PublicKey | None = (deserialize_public_key(msg.key) if msg.key
                                 else sender.extract_public_key())
        if key is None or ID.from_pubkey(key) != sender:
            return False
        return bool(key.verify(_signed_bytes(msg), msg.signature))
    except Exception:  # a malformed key or peer id is as bad as a wrong signature
        return False


class SigningPubsub(Pubsub):
    """py-libp2p's Pubsub that signs every message it publishes (signature and key) while
    leaving received messages to the topic validators (py-libp2p's strict_signing stays off).
    A message is the same as py-libp2p's own strict publish makes: 8-byte big-endian seqno,
    message id from + seqno, which is what js-libp2p's StrictSign expects."""

    def __init__(self, host: IHost, router: IPubsubRouter, **options: Any) -> None:
        super().__init__(host, router, strict_signing=False, **options)
        self.sign_key = host.get_private_key()  # None: publishes unsigned (previous release)

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        msg = rpc_pb2.Message(data=data, topicIDs=topics, from_id=self.my_id.to_bytes(),
                              seqno=self._next_seqno())
        if self.sign_key is not None:
            msg.signature = self.sign_key.sign(_signed_bytes(msg))
            msg.key = self.host.get_public_key().serialize()
        await self.push_msg(self.my_id, msg)
