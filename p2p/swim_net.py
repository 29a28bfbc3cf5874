# The network side of SWIM membership (the sans-IO core is p2p/swim.py): signing and checking
# the records members publish about themselves with their node keys, carrying the core's
# messages as one-way messages of the request/response layer (SWIM is a datagram protocol:
# its own acks and timeouts detect failures, an rpc reply would only cost a frame), feeding
# it the clock, and showing its view in
# the shapes the rest of tasknet knows (p2p.membership's Member, MemberState, MemberEvent).
# Lives here: `SwimLink`, owned by the Network that starts it in its nursery. Must not live
# here: the protocol's rules (swim.py), libp2p details (network.py, rpc.py).
from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgpack
import trio
from libp2p.peer.id import ID

from . import swim
from .identity import Identity, verify_signature
from .membership import Member, MemberEvent, MemberState

if TYPE_CHECKING:
    from .network import Network

log = logging.getLogger(__name__)

PROTOCOL = "swim"
RECORD_DOMAIN = b"tasknet-swim-record-v1\x00"
CLAIM_DOMAIN = b"tasknet-swim-claim-v1\x00"
VERIFIED_KEPT = 8192  # records whose signature was checked, kept to skip checking them again
MAX_MESSAGE = 1024 * 1024
SEND_TIMEOUT_FACTOR = 2.0  # writing a message (and opening its stream) may take this many
# probe timeouts

_STATE = {swim.ALIVE: MemberState.ALIVE, swim.SUSPECT: MemberState.SUSPECT,
          swim.DEAD: MemberState.DEAD, swim.LEFT: MemberState.DEAD}


def old_member(m: swim.Member, now: float) -> Member:
    """A SWIM member in the shape of p2p.membership.Member (left is dead with `left`)."""
    return Member(m.peer_id, m.addrs, m.incarnation, now, _STATE[m.state], left=m.left)


class RecordSigner:
    """Signs this node's records and checks others' (Ed25519 over the record body, bound to
    the network id so a record cannot be replayed into another network). A record of a peer
    the network's admission rule does not admit is refused like a forged one: such a peer
    never enters the membership view."""

    def __init__(self, identity: Identity, network_id: str,
                 admits: Callable[[str], bool] = lambda peer: True) -> None:
        self.identity = identity
        self.domain = RECORD_DOMAIN + network_id.encode() + b"\x00"
        self.claim_domain = CLAIM_DOMAIN + network_id.encode() + b"\x00"
        self._admits = admits
        self._verified: OrderedDict[bytes, swim.RecordInfo] = OrderedDict()

    def sign(self, info: swim.RecordInfo) -> bytes:
        body = swim.pack_record_body(info)
        return bytes(msgpack.packb([body, self.identity.sign(self.domain + body)]))

    def sign_claim(self, body: bytes) -> bytes:
        """This node's signature over a suspicion it raises (swim.claim_body)."""
        return self.identity.sign(self.claim_domain + body)

    def verify_claim(self, peer_id: str, body: bytes, signature: bytes) -> bool:
        """Whether `peer_id` signed the claim (its key is in its peer id); relayed
        suspicions count as their origin's confirmation only then."""
        return self._admits(peer_id) and _signed_by(peer_id, self.claim_domain + body,
                                                    signature)

    def verify(self, peer_id: str, record: bytes) -> swim.RecordInfo | None:
        if not self._admits(peer_id):
            return None
        known = self._verified.get(record)
        if known is not None:
            return known if known.peer_id == peer_id else None
        try:
            body, signature = msgpack.unpackb(record, raw=False)
            if not isinstance(body, bytes) or not isinstance(signature, bytes):
                return None
            info = swim.unpack_record_body(body)
            if info is None or info.peer_id != peer_id:
                return None
        except Exception:
            return None
        if not _signed_by(peer_id, self.domain + body, signature):
            return None
        self._verified[record] = info
        if len(self._verified) > VERIFIED_KEPT:
            self._verified.popitem(last=False)
        return info


def _signed_by(peer_id: str, message: bytes, signature: bytes) -> bool:
    """Whether `signature` over `message` is `peer_id`'s (its public key is in its id)."""
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return False
    return public_key is not None and verify_signature(public_key.to_bytes(), message,
                                                       signature)


class SwimLink:
    """Runs one node's Swim over the network: a timer task, the `swim` protocol's handler and
    one short-lived task per message sent."""

    def __init__(self, net: Network, config: swim.SwimConfig,
                 emit: Callable[[list[MemberEvent]], None]) -> None:
        self.net = net
        self.emit = emit
        self.signer = RecordSigner(net.identity, net.config.network_id, net.admits)
        self.core = swim.Swim(
            net.peer_id, net.addrs, sign_record=self.signer.sign,
            verify_record=self.signer.verify, sign_claim=self.signer.sign_claim,
            verify_claim=self.signer.verify_claim, incarnation=net.incarnation,
            boot=net.incarnation, config=config, rng=random.Random(), now=time.monotonic())
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self.metrics = {"swim_sent": 0, "swim_send_failures": 0, "swim_received": 0,
                        "swim_rejected": 0, "swim_bytes_sent": 0, "swim_unadmitted": 0,
                        "swim_offences": 0,  # what the core refused as abuse (Offence)
                        # of swim_bytes_sent: the updates and entries the messages carried
                        "swim_carried_bytes_sent": 0}
        for kind in swim.KIND.values():  # per message kind: messages and bytes sent
            self.metrics[f"swim_sent_{kind}"] = 0
            self.metrics[f"swim_bytes_sent_{kind}"] = 0

    # -- views: members the admission rule admits now (a stake that ran out removes its
    # peer from the view at once, before the protocol forgets it) ---------------------------
    def members(self) -> list[Member]:
        now = time.monotonic()
        admits = self.net.admits
        return [old_member(m, now) for m in self.core.members() if admits(m.peer_id)]

    def get(self, peer_id: str) -> Member | None:
        m = self.core.get(peer_id)
        return None if m is None or peer_id == self.net.peer_id or not self.net.admits(
            peer_id) else old_member(m, time.monotonic())

    def alive_ids(self) -> set[str]:
        ids = self.core.alive_ids()
        if self.net.admission.rule.closed:
            ids = {peer for peer in ids if self.net.admits(peer)}
        return ids

    # -- running --------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery, seeds: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        self._nursery = nursery
        self.net.handle(PROTOCOL, self._on_request)
        self._apply(self.core.join(list(seeds), time.monotonic()))
        nursery.start_soon(self._clock)

    async def _clock(self) -> None:
        while True:
            now = time.monotonic()
            self._apply(self.core.tick(now))
            wait = max(0.01, min(0.5, self.core.next_wakeup() - time.monotonic()))
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    def contact(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """The transport just reached `peer_id`, which this view does not hold alive (a
        bootstrap peer that restarted, the other side of a healed partition): reconcile with
        it now instead of waiting for the periodic exchange."""
        member = self.core.get(peer_id)
        if member is not None and member.state is swim.ALIVE:
            return
        self._apply(self.core.sync_with(peer_id, addrs, time.monotonic()))

    async def leave(self, timeout: float) -> None:
        """Tell a few members that this node leaves for good, within `timeout` seconds."""
        outputs = self.core.leave(time.monotonic())
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for output in outputs:
                    if isinstance(output, swim.Send):
                        nursery.start_soon(self._send, output)

    def _apply(self, outputs: list[swim.Output]) -> None:
        events: list[MemberEvent] = []
        now = time.monotonic()
        for output in outputs:
            if isinstance(output, swim.Send):
                if self._nursery is not None:
                    self._nursery.start_soon(self._send, output)
            elif isinstance(output, swim.Offence):
                self.metrics["swim_offences"] += 1
                log.debug("swim: %s refused from %s", output.reason, output.peer)
                self.net.penalize(output.peer, output.reason)
            else:
                events.append(self._event(output, now))
        if events:
            self.emit(events)

    def _event(self, event: swim.Event, now: float) -> MemberEvent:
        return MemberEvent(
            event.peer_id,
            None if event.previous is None else _STATE[event.previous],
            None if event.current is None else _STATE[event.current],
            old_member(event.member, now),
            event.restarted,
        )

    async def _send(self, output: swim.Send) -> None:
        message = output.message
        data = swim.encode(message)
        kind = swim.KIND[type(message)]
        metrics = self.metrics
        metrics["swim_sent"] += 1
        metrics["swim_bytes_sent"] += len(data)
        metrics[f"swim_sent_{kind}"] += 1
        metrics[f"swim_bytes_sent_{kind}"] += len(data)
        metrics["swim_carried_bytes_sent"] += swim.carried_bytes(message)
        if output.addrs:
            self.net._remember_addrs(output.to, output.addrs)
        timeout = SEND_TIMEOUT_FACTOR * self.core.config.probe_timeout * (
            1 + self.core.local_health)
        try:
            # one way: a peer that cannot be reached (no connection, a failed or stalled
            # write) raises here; one that is reached but does not act on the message is
            # found out by the protocol's own ack timeouts
            await self.net.notify(output.to, PROTOCOL, data, timeout=max(1.0, timeout))
        except Exception as exc:  # unreachable, refused, timed out: the core decides
            self.metrics["swim_send_failures"] += 1
            log.debug("swim message to %s failed: %r", output.to, exc)
            self._apply(self.core.unreachable(output.to, time.monotonic()))
        self._wake.set()

    async def _on_request(self, caller: str, data: Any) -> Any:
        if not self.net.admits(caller):
            # not scored: a node that is about to be admitted (its stake on its way) knocks
            # here too; it is simply not heard until the rule admits it
            self.metrics["swim_unadmitted"] += 1
            return None
        if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
            self.metrics["swim_rejected"] += 1
            self.net.penalize(caller, "malformed")
            return None
        try:
            message = swim.decode(data)
        except swim.MalformedMessage as exc:
            self.metrics["swim_rejected"] += 1
            log.info("malformed swim message from %s: %s", caller, exc)
            self.net.penalize(caller, "malformed")
            return None
        self.metrics["swim_received"] += 1
        self._apply(self.core.receive(caller, message, time.monotonic()))
        self._wake.set()
        return None
