# The embeddable p2p node: a libp2p host (TCP + Noise + Yamux) with signed GossipSub topics,
# a live membership view (SWIM over a request/response protocol: p2p/swim.py, swim_net.py),
# discovery with redial backoff, and request/response protocols.
# Lives here: wiring py-libp2p together and the trio tasks that drive the sans-IO cores
# (membership, envelopes, scores). Must not live here: the data store or task logic.
from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from .admission import GOSSIP_MEMBERS, Admission
from .config import NetworkConfig
from .envelope import Envelope, EnvelopeError, ReplayGuard, open_envelope, seal
from .identity import Identity, load_or_create_identity, peer_id_from_public_key
from .libp2p_fixes import apply_all as apply_libp2p_fixes
from .libp2p_fixes import (
    forget_dial_failures,
    refuse_at_the_door,
    registered_stream_is_live,
    report_faults_to,
)
from .membership import Member, MemberEvent, MemberState
from .pubsub_signing import SigningPubsub, is_signed, signature_valid
from .rpc import Handler, RpcLimits, RpcService
from .scoring import PeerScores
from .swim import SwimConfig
from .swim_net import SwimLink

log = logging.getLogger(__name__)

MEMBERSHIP_TOPIC = "members"
INCARNATION_FILE = "incarnation"
# replayed gossip a forwarder may pass on per window before it counts against it (a restarted
# node gets dozens of old messages re-delivered at once)
REPLAYS_ALLOWED = 500
REPLAY_WINDOW_S = 60.0
SOCKETS_CLOSE_S = 1.0  # how long a stopping node waits for its libp2p sockets to close
SOCKET_CLOSE_S = 0.25  # ... and for any one of them
CLOSE_ROUNDS = 4  # ... closing again those that opened while it closed the others
# the entries of status()["metrics"] that are levels now (gauges); every other one counts
# since the node started (a counter)
GAUGE_METRICS = frozenset({"stranger_connections", "swim_local_health", "swim_pending_updates"})


class ConfigError(ValueError):
    """The configuration cannot be used (bad address, port in use, unreadable data dir)."""


@dataclass(frozen=True)
class GossipMessage:
    topic: str
    author: str  # peer id of the signer
    seq: int
    payload: Any
    size: int = 0  # bytes of the signed envelope as it arrived


class Subscription:
    """Messages of one topic, in arrival order. Iterate it with `async for`."""

    def __init__(self, topic: str, receive: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        self.topic = topic
        self._receive = receive

    def __aiter__(self) -> AsyncIterator[GossipMessage]:
        return self._receive.__aiter__()

    async def next(self) -> GossipMessage:
        return await self._receive.receive()


def _holds(error: BaseException, target: BaseException) -> bool:
    """Whether `error` is `target` or an exception group that contains it."""
    if error is target:
        return True
    if isinstance(error, BaseExceptionGroup):
        return any(_holds(inner, target) for inner in error.exceptions)
    return False


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:
        raise ConfigError(f"not a multiaddr: {text!r} ({exc})") from None


async def _release_sockets(host: IHost) -> None:
    """Close the host's listeners, then its connections, before it stops. py-libp2p 0.8.1
    closes them in a `finally` of its swarm that, under the cancellation that stops it, ends
    at its first await: the listeners (sockets and accepting tasks, trio system tasks) stayed
    for the rest of the process, so a node stopped and started again in one process found
    its own port taken while the old listener went on accepting; and connections this node
    dialed stayed open, so its peers kept sending to a node that had stopped.
    Connections close at once, not one after the other (each takes py-libp2p ~0.2 s, so a
    node with a few peers ran out of time and left some open), and again for any that opened
    meanwhile (a request or a dial still under way when the node began to stop): a connection
    left open looks alive to its peer, which then sent the node's next run its messages into
    it (a restarted member stayed unreachable until the peer gave up on it, 5 to 15 s)."""
    network = host.get_network()
    # by id(), holding the object: an id is reused only once its object is collected
    tried: dict[int, object] = {}

    async def close_one(close: Callable[[], Awaitable[object]]) -> None:
        with trio.move_on_after(SOCKET_CLOSE_S):
            try:
                await close()
            except Exception as exc:  # stopping goes on; the process may still hold it
                log.debug("a libp2p listener or connection did not close: %r", exc)

    deadline = trio.current_time() + SOCKETS_CLOSE_S
    with trio.CancelScope(shield=True, deadline=deadline) as everything:
        for _ in range(CLOSE_ROUNDS):
            listeners = [x for x in list(network.listeners.values()) if id(x) not in tried]
            conns = [c for cs in list(network.connections.values()) for c in cs
                     if id(c) not in tried and not c.is_closed]
            if not listeners and not conns:
                break
            tried.update((id(x), x) for x in (*listeners, *conns))
            async with trio.open_nursery() as closing:  # listeners first: nobody dials in
                for listener in listeners:
                    closing.start_soon(close_one, listener.close)
            async with trio.open_nursery() as closing:
                for conn in conns:
                    closing.start_soon(close_one, conn.close)
    if everything.cancelled_caught:
        log.warning("libp2p listeners and connections did not close within %.0f s",
                    SOCKETS_CLOSE_S)


def _next_incarnation(config: NetworkConfig) -> int:
    path = config.data_dir / INCARNATION_FILE
    try:
        previous = int(path.read_text().strip()) if path.exists() else 0
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    current = previous + 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{current}\n")
    tmp.replace(path)
    return current


def swim_config(config: NetworkConfig) -> SwimConfig:
    """The membership protocol's settings from the network's: a probe every heartbeat
    interval, a suspicion that lasts at least dead_after - suspect_after seconds."""
    period = config.heartbeat_interval
    return SwimConfig(period=period, probe_timeout=period / 2,
                      suspicion_floor=max(1.0, config.dead_after - config.suspect_after))


def gossipsub_options() -> dict[str, Any]:
    """The arguments of py-libp2p's GossipSub router that every node uses (a fresh dict per
    call; benchmarks/gossip.py builds its raw py-libp2p reference from them too)."""
    return {
        # v1.1 only: v1.2 adds an IDONTWANT control message per received message, which
        # costs more CPU than it saves for our small messages (measured: -40% idle CPU)
        "protocols": [PROTOCOL_ID_V11],
        "degree": 6,
        "degree_low": 4,
        "degree_high": 12,
        "heartbeat_interval": 1,
        "heartbeat_initial_delay": 0.1,
        # py-libp2p's defaults drop publishers above 10 msg/s and want 3 distinct IPs in a
        # mesh; both break real traffic and loopback clusters. Our envelopes and peer
        # scores do the spam control instead.
        "spam_protection_enabled": False,
        "eclipse_protection_enabled": False,
    }


def _dialable(addrs: tuple[str, ...]) -> list[multiaddr.Multiaddr]:
    """The addresses of a member's record that parse as multiaddrs (without /p2p/...). A
    record is signed by its member, who may write anything there (a later release's transport
    this one does not know, or garbage): those addresses are skipped, never raised on."""
    parsed = []
    for text in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(text.split("/p2p/")[0]))
        except Exception:
            continue
    return parsed


def _innermost(exc: BaseException) -> BaseException:
    """The error inside the exception groups that nurseries wrap a single error in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _BanNotifee(INotifee):
    """Tells the network of each new connection, so a banned peer's is dropped at once and
    one of a stranger beyond the cap is closed, and of each closed one."""

    def __init__(self, net: Network) -> None:
        self._net = net

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = str(conn.muxed_conn.peer_id)
        self._net._refuse_connection(peer)
        self._net._limit_strangers(peer, conn)
        self._net._another_connection(peer, conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._net._stranger_gone(conn)
        self._net._connection_gone(str(conn.muxed_conn.peer_id))

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class Network:
    """A running tasknet p2p node. Build it with `async with Network.start(config) as net`."""

    def __init__(self, config: NetworkConfig, identity: Identity, incarnation: int) -> None:
        self.config = config
        self.identity = identity
        self.incarnation = incarnation
        self.peer_id = str(identity.peer_id)
        self._swim: SwimLink | None = None
        self.scores = PeerScores()
        self.admission = Admission(config.admission, self.peer_id)
        self.replay_guard = ReplayGuard()
        self.metrics: dict[str, int] = {
            "gossip_published": 0,
            "gossip_delivered": 0,
            "gossip_rejected": 0,
            "gossip_replayed": 0,  # of those rejected: old messages re-delivered (harmless)
            "gossip_dropped_slow_subscriber": 0,
            "dials": 0,
            "dial_failures": 0,
            "banned_refused": 0,  # streams and connections of banned peers refused
            "libp2p_faults": 0,  # errors a peer provoked inside py-libp2p, contained
            "unadmitted_refused": 0,  # requests of peers the admission rule does not admit
            "gossip_unadmitted": 0,  # gossip authored by them, dropped (members-only gossip)
            "gossip_unsigned_refused": 0,  # without a libp2p signature, refused by the config
            "silent_rebuilds": 0,  # pubsub streams rebuilt with connected peers not heard
            "silent_disconnects": 0,  # connections dropped because a rebuild did not help
            # (stranger_connections, the ones held now, is counted in status())
            # connections of peers a closed rule does not admit, closed beyond the cap, and
            # closed after stranger_connection_max_s
            "stranger_connections_closed": 0,
            "stranger_connections_expired": 0,
        }
        self._seq = time.time_ns() // 1000  # grows across restarts: replay guards stay valid
        self._started = time.monotonic()
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._rpc: RpcService | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._replays: dict[str, tuple[float, int]] = {}  # forwarder -> (window start, count)
        self._subscribers: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = {}
        self._joined_topics: set[str] = set()
        self._verified: OrderedDict[bytes, Envelope] = OrderedDict()
        self._event_listeners: list[trio.MemorySendChannel[MemberEvent]] = []
        self._redial_at: dict[str, tuple[float, float]] = {}  # peer -> (next try, backoff)
        self._rng = random.Random(self.peer_id)
        self._bootstrap = [info_from_p2p_addr(parse_multiaddr(a)) for a in config.bootstrap]
        self._seen_bootstrap_ids = {str(info.peer_id) for info in self._bootstrap}
        self._blocked: set[str] = set()
        self._connected_since: dict[str, tuple[float, int]] = {}  # peer -> (since, strikes)
        # the connections peers the rule does not admit hold: id -> (peer, connection, when)
        self._strangers: dict[int, tuple[str, INetConn, float]] = {}

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def start(cls, config: NetworkConfig) -> AsyncIterator[Network]:
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use data dir {config.data_dir}: {exc}") from None
        listen = [parse_multiaddr(a) for a in config.listen]
        for bootstrap_addr in config.bootstrap:
            if "/p2p/" not in bootstrap_addr:
                raise ConfigError(f"bootstrap address needs /p2p/<peer-id>: {bootstrap_addr}")
        identity = load_or_create_identity(config.data_dir)
        net = cls(config, identity, _next_incarnation(config))
        async with net._run(listen):
            yield net

    @asynccontextmanager
    async def _run(self, listen: list[multiaddr.Multiaddr]) -> AsyncIterator[None]:
        apply_libp2p_fixes()
        key_pair = self.identity.key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference="YAMUX",
            listen_addrs=listen,
            enable_mDNS=self.config.enable_mdns,
            # our discovery loop chooses whom to dial, with its own backoff; py-libp2p's
            # auto-connector would otherwise dial every address it has ever heard of
            connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
        )
        gossipsub = GossipSub(**gossipsub_options())
        # signs what it publishes; what it receives is checked in _validate (a signature is
        # required only once accept_unsigned_gossip is off)
        pubsub = SigningPubsub(
            host,
            gossipsub,
            max_inbound_rpc_size=self.config.max_gossip_size * 2,
        )
        # py-libp2p numbers a node's messages from 1 at every start, so after a restart its
        # messages repeat ids its peers still hold as seen and are dropped: start from the clock
        pubsub.counter = time.time_ns() // 1000
        self._host, self._pubsub = host, pubsub
        self._rpc = RpcService(
            host,
            self.config.network_id,
            RpcLimits(
                max_frame=self.config.max_frame_size,
                request_timeout=self.config.request_timeout,
                max_concurrent_per_peer=self.config.max_concurrent_requests_per_peer,
            ),
            self.penalize,
            is_blocked=self._is_refused,
        )
        for owner in (host, host.get_network(), pubsub, gossipsub):
            report_faults_to(owner, self._on_libp2p_fault)
        refuse_at_the_door(host, self._refuse_stream)
        host.get_network().register_notifee(_BanNotifee(self))
        started = False
        body_error: BaseException | None = None
        try:
            async with (
                host.run(listen_addrs=listen),
                background_trio_service(pubsub),
                background_trio_service(gossipsub),
                trio.open_nursery() as nursery,
            ):
                try:
                    if any(str(a) not in host.get_network().listeners for a in listen):
                        # py-libp2p logs a failed listen (say, port in use) and runs on
                        # without it
                        raise OSError("address in use or not available")
                    started = True
                    await pubsub.wait_until_ready()
                    self._nursery = nursery
                    self._rpc.attach(nursery)
                    # membership no longer rides on gossip, but every node stays subscribed
                    # to its topic: that is how a stale pubsub stream is noticed
                    membership = await self.subscribe_raw(MEMBERSHIP_TOPIC)
                    nursery.start_soon(self._drain, membership)
                    self._swim = SwimLink(self, swim_config(self.config), self._emit)
                    self._swim.start(nursery, [
                        (str(info.peer_id), tuple(str(a) for a in info.addrs))
                        for info in self._bootstrap])
                    nursery.start_soon(self._discovery_loop)
                    try:
                        yield
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        self._stopping = True
                        if self.config.leave_on_stop:
                            with trio.CancelScope(shield=True,
                                                  deadline=trio.current_time() + 0.5):
                                await self._swim.leave(0.5)
                finally:  # a failed start too: py-libp2p's own teardown leaks these
                    # this node's own tasks stop first, so that none of them (a probe, a
                    # dial) opens a connection while the others close
                    nursery.cancel_scope.cancel()
                    await _release_sockets(host)
        except Exception as exc:
            if started and body_error is None:
                # py-libp2p can raise from its own tasks while it tears down (a peer dialing
                # in as the swarm's nursery closes). The node has stopped either way.
                log.warning("libp2p reported an error while stopping: %r", exc)
                return
            if started:
                if isinstance(body_error, Exception) and _holds(exc, body_error):
                    # the caller's own error, not wrapped in the groups of our nurseries
                    raise body_error.with_traceback(body_error.__traceback__) from None
                raise
            addrs = [str(a) for a in listen]
            raise ConfigError(f"cannot listen on {addrs}: {_innermost(exc)}") from None

    # -- identity and status -------------------------------------------------------------
    @property
    def host(self) -> IHost:
        assert self._host is not None, "network is not running"
        return self._host

    @property
    def addrs(self) -> list[str]:
        """Dialable addresses, each ending in /p2p/<peer-id>."""
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self.host.get_connected_peers())

    def members(self) -> list[Member]:
        """Every known member, this node included (always alive to itself)."""
        me = Member(self.peer_id, tuple(self.addrs), self.incarnation, time.monotonic(),
                    MemberState.ALIVE)
        return sorted([me, *self.view.members()], key=lambda m: m.peer_id)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "peer_id": self.peer_id,
            "network": self.config.network_id,
            "addrs": self.addrs,
            "incarnation": self.incarnation,
            "uptime_s": round(now - self._started, 1),
            "connected_peers": self.connected_peers(),
            "members": [m.to_dict(now) for m in self.members()],
            "metrics": {**self.metrics, **self._rpc_metrics(),
                        # held now by peers a closed rule does not admit
                        "stranger_connections": self._stranger_connections()},
            "admission": self.admission.status(),
            "offences": dict(self.scores.offences),
            "peer_scores": self.scores.snapshot(now),
        }

    def _rpc_metrics(self) -> dict[str, int]:
        rpc = self._rpc
        metrics = {"rpc_served": rpc.served, "rpc_refused": rpc.refused,
                   "rpc_streams_renewed": rpc.streams_renewed} if rpc else {}
        if self._swim is not None:
            metrics.update(self._swim.metrics)
            metrics["swim_local_health"] = self._swim.core.local_health
            metrics["swim_pending_updates"] = self._swim.core.pending_updates()
            metrics.update({f"swim_{k}": v for k, v in self._swim.core.stats.items()})
        return metrics

    @asynccontextmanager
    async def member_events(self) -> AsyncIterator[trio.MemoryReceiveChannel[MemberEvent]]:
        """Membership changes as they happen (joined, suspect, dead, alive again, forgotten)."""
        send, receive = trio.open_memory_channel[MemberEvent](1024)
        self._event_listeners.append(send)
        try:
            yield receive
        finally:
            self._event_listeners.remove(send)
            await send.aclose()

    # -- gossip --------------------------------------------------------------------------
    def _topic(self, name: str) -> str:
        return f"/tasknet/{self.config.network_id}/{name}"

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def publish(self, topic: str, payload: Any) -> None:
        """Sign `payload` and publish it to `topic` of this node's network."""
        data = seal(self.identity, self.config.network_id, topic, self._next_seq(), payload)
        if len(data) > self.config.max_gossip_size:
            raise ValueError(f"message of {len(data)} bytes exceeds max_gossip_size")
        assert self._pubsub is not None
        await self._pubsub.publish(self._topic(topic), data)
        self.metrics["gossip_published"] += 1

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        """Receive verified messages of `topic` while the context is open."""
        receive = await self.subscribe_raw(topic)
        try:
            yield Subscription(topic, receive)
        finally:
            await receive.aclose()

    async def subscribe_raw(self, topic: str) -> trio.MemoryReceiveChannel[GossipMessage]:
        send, receive = trio.open_memory_channel[GossipMessage](self.config.subscriber_queue)
        self._subscribers.setdefault(topic, []).append(send)
        if topic not in self._joined_topics:
            self._joined_topics.add(topic)
            await self._join(topic)
        return receive

    async def _join(self, topic: str) -> None:
        assert self._pubsub is not None and self._nursery is not None
        full = self._topic(topic)

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            return self._validate(topic, forwarder, msg)

        self._pubsub.set_topic_validator(full, validate, is_async_validator=False)
        subscription = await self._pubsub.subscribe(full)
        self._nursery.start_soon(self._deliver_loop, topic, subscription)

    def _validate(self, topic: str, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        if self._blocked and (
            str(forwarder) in self._blocked or ID(msg.from_id).to_base58() in self._blocked
        ):
            return False  # fault injection: this peer is on the other side of a partition
        if self._members_only_gossip() and msg.from_id and not self.admits(
                ID(msg.from_id).to_base58()):
            self.metrics["gossip_unadmitted"] += 1  # an admitted relay is not to blame
            return False
        if is_signed(msg):
            if not signature_valid(msg):
                self.metrics["gossip_rejected"] += 1
                log.warning("refused gossip on %s forwarded by %s: bad libp2p signature",
                            topic, forwarder)
                # nodes of the previous release relay without checking the signature, so
                # while they may be around only the origin itself is to blame
                origin = forwarder.to_bytes() == msg.from_id
                if forwarder != self.host.get_id() and (
                        origin or not self.config.accept_unsigned_gossip):
                    self.penalize(str(forwarder), "forged")
                return False
        elif not self.config.accept_unsigned_gossip:
            # a node of the previous release (or a relay of its gossip): not an offence
            self.metrics["gossip_unsigned_refused"] += 1
            log.debug("refused unsigned gossip on %s forwarded by %s", topic, forwarder)
            return False
        try:
            envelope = open_envelope(
                msg.data,
                network=self.config.network_id,
                channel=topic,
                max_size=self.config.max_gossip_size,
            )
            if msg.from_id and peer_id_from_public_key(envelope.author).to_bytes() != msg.from_id:
                raise EnvelopeError("author", "envelope author differs from message origin")
            self.replay_guard.check_and_record(envelope.author, envelope.seq)
        except EnvelopeError as exc:
            self.metrics["gossip_rejected"] += 1
            if exc.reason == "replayed":
                self.metrics["gossip_replayed"] += 1
                # gossipsub re-delivers old messages to a peer that restarted (dozens at
                # once), so honest peers forward replays: within an allowance one is
                # dropped, not logged as a fault nor held against its forwarder
                if not self._replay_allowance_spent(str(forwarder), time.monotonic()):
                    log.debug("dropped replayed gossip on %s forwarded by %s: %s",
                              topic, forwarder, exc)
                    return False
            log.warning("refused gossip on %s forwarded by %s: %s", topic, forwarder, exc)
            if forwarder != self.host.get_id():
                self.penalize(str(forwarder), exc.reason)
            return False
        self._verified[msg.from_id + msg.seqno] = envelope
        while len(self._verified) > 8192:
            self._verified.popitem(last=False)
        return True

    async def _deliver_loop(self, topic: str, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            envelope = self._verified.pop(msg.from_id + msg.seqno, None)
            if envelope is None:
                continue  # evicted before delivery; validation already counted it
            message = GossipMessage(
                topic, str(peer_id_from_public_key(envelope.author)), envelope.seq,
                envelope.payload, len(msg.data),
            )
            for send in list(self._subscribers.get(topic, ())):
                try:
                    send.send_nowait(message)
                    self.metrics["gossip_delivered"] += 1
                except trio.WouldBlock:
                    self.metrics["gossip_dropped_slow_subscriber"] += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    self._subscribers[topic].remove(send)

    # -- request / response --------------------------------------------------------------
    def handle(self, protocol: str, handler: Handler, *, version: int = 1) -> TProtocol:
        """Serve `protocol` (`/tasknet/<network>/<protocol>/<version>`) with `handler`,
        an async function (peer_id, message) -> reply."""
        assert self._rpc is not None
        return self._rpc.handle(protocol, handler, version)

    def refuse_unadmitted(self, peer: str, what: str) -> None:
        """Count and score a request of a peer that is not admitted. Not scored while the
        gate has no reading yet (stake rule, chain not read): the refusal is then ours."""
        self.metrics["unadmitted_refused"] += 1
        log.debug("refused %s from %s: not admitted", what, peer)
        if self.admission.settled:
            self.penalize(peer, "unadmitted")

    # -- admission -----------------------------------------------------------------------
    def admits(self, peer: str) -> bool:
        """Whether the network's admission rule admits `peer` now (this node: itself)."""
        return self.admission.admits(peer)

    def set_staked(self, peers: set[str]) -> None:
        """A new stake reading for the stake admission rule (the node reads the chain)."""
        if self.admission.set_staked(peers):
            log.info("admission: %d peers hold the stake now", len(peers))
            if self._pubsub is not None:
                self._apply_gossip_policy()
            self._count_lapsed_strangers()

    def _count_lapsed_strangers(self) -> None:
        """Peers whose admission lapsed with a new reading may still be connected: their
        connections count against the cap on strangers from now on, and those beyond it
        are closed, as for a stranger that connects."""
        if not self.admission.rule.closed or self._nursery is None or self._stopping:
            return
        network = self.host.get_network()
        for peer in self.connected_peers():
            if self.admits(peer):
                continue
            for conn in list(network.get_connections(ID.from_base58(peer))):
                if id(conn) not in self._strangers:
                    self._limit_strangers(peer, conn)

    def _members_only_gossip(self) -> bool:
        return self.admission.rule.gossip == GOSSIP_MEMBERS

    def _apply_gossip_policy(self) -> None:
        """Members-only gossip: keep the peers the rule does not admit out of pubsub (no
        mesh place, nothing they send is read), and let admitted ones back in."""
        if self._pubsub is None or not self._members_only_gossip():
            return
        listed = {str(p) for p in self._pubsub.get_blacklisted_peers()}
        for peer in self.connected_peers():
            if not self.admits(peer) and peer not in listed:
                self._pubsub.add_to_blacklist(ID.from_base58(peer))
        for peer in listed:
            if self.admits(peer) and not self.is_banned(peer):
                self._pubsub.remove_from_blacklist(ID.from_base58(peer))

    async def request(
        self, peer_id: str, protocol: str, message: Any, *, version: int = 1,
        timeout: float | None = None,
    ) -> Any:
        assert self._rpc is not None
        self._dial_hint(peer_id)
        return await self._rpc.request(
            peer_id, protocol, message, version=version, timeout=timeout
        )

    async def notify(
        self, peer_id: str, protocol: str, message: Any, *, version: int = 1,
        timeout: float | None = None,
    ) -> None:
        """A one-way message to `peer_id`'s `protocol` handler (its return value is not sent
        back): returns once written; raises as `request` does when the peer cannot be reached
        or the write fails or takes longer than `timeout`."""
        assert self._rpc is not None
        self._dial_hint(peer_id)
        await self._rpc.notify(peer_id, protocol, message, version=version, timeout=timeout)

    def _dial_hint(self, peer_id: str) -> None:
        """Before a request or message: a member not connected now is dialled at the
        addresses membership knows for it."""
        member = self.view.get(peer_id)
        if member is not None and peer_id not in self.connected_peers():
            self._remember_addrs(peer_id, member.addrs)

    # -- membership ----------------------------------------------------------------------
    @property
    def view(self) -> SwimLink:
        """The membership view (members(), get(peer), alive_ids()), once the node runs."""
        assert self._swim is not None, "network is not running"
        return self._swim

    def heartbeat_every(self) -> float:
        """The membership protocol's period (one probe per period)."""
        return self.config.heartbeat_interval

    def _replay_allowance_spent(self, forwarder: str, now: float) -> bool:
        """Count a replayed message from `forwarder`; True once it forwarded more than
        REPLAYS_ALLOWED of them within REPLAY_WINDOW_S."""
        start, count = self._replays.get(forwarder, (now, 0))
        if now - start > REPLAY_WINDOW_S:
            start, count = now, 0
        self._replays[forwarder] = (start, count + 1)
        if len(self._replays) > 4096:  # forget the oldest forwarders
            del self._replays[next(iter(self._replays))]
        return count + 1 > REPLAYS_ALLOWED

    async def _drain(self, receive: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async for _ in receive:  # nodes of earlier releases gossiped heartbeats here
            pass

    def _emit(self, events: list[MemberEvent]) -> None:
        for event in events:
            log.info("member %s: %s -> %s", event.peer_id,
                     event.previous and event.previous.value,
                     event.current and event.current.value)
            if event.current is MemberState.ALIVE:
                self._remember_addrs(event.peer_id, event.member.addrs)
                if self._host is not None:  # back (or new): a dial to it may succeed now
                    forget_dial_failures(self._host, event.peer_id)
                if event.restarted or event.previous is MemberState.DEAD:
                    self._redial_at.pop(event.peer_id, None)
                    if self._rpc is not None:  # its old streams died with its old process
                        self._rpc.forget_peer(event.peer_id)
                    if event.restarted and self._nursery is not None and not self._stopping:
                        # so may its old connection, which py-libp2p can keep as if alive:
                        # the next request dials the new process afresh
                        self._nursery.start_soon(self._disconnect, event.peer_id)
            if event.current is MemberState.DEAD and self._rpc is not None:
                self._rpc.forget_peer(event.peer_id)
            for send in self._event_listeners:
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    log.warning("a member-event listener is too slow; event dropped")

    def _remember_addrs(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        parsed = _dialable(addrs)
        if parsed:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer_id), parsed, 600)

    # -- discovery -----------------------------------------------------------------------
    async def _discovery_loop(self) -> None:
        while True:
            self._forget_redials()
            self._lift_expired_bans(time.monotonic())
            self._expire_strangers(time.monotonic())
            await self._reset_silent_peers(time.monotonic())
            async with trio.open_nursery() as dials:
                for peer in self._dial_candidates(time.monotonic()):
                    dials.start_soon(self._dial, peer)
            await trio.sleep(min(1.0, self.config.heartbeat_interval))

    def _dial_candidates(self, now: float) -> list[PeerInfo]:
        connected = set(self.connected_peers()) | self._blocked
        candidates = [info for info in self._bootstrap
                      if str(info.peer_id) not in connected and str(info.peer_id) != self.peer_id]
        wanted = self.config.target_connections - len(connected)
        if wanted > 0:
            alive = [m for m in self.view.members()
                     if m.state is MemberState.ALIVE and m.peer_id not in connected
                     and m.peer_id not in self._seen_bootstrap_ids]
            self._rng.shuffle(alive)
            for member in alive[:wanted]:
                addrs = _dialable(member.addrs)
                if addrs:  # none that parses: nowhere to dial it
                    candidates.append(PeerInfo(ID.from_base58(member.peer_id), addrs))
        return [c for c in candidates
                if self._redial_at.get(str(c.peer_id), (0.0, 0.0))[0] <= now
                and not self._is_refused(str(c.peer_id))]

    def _forget_redials(self) -> None:
        """Drop the redial backoff of peers that are no longer dial candidates: neither
        bootstrap peers nor members the view holds (forgotten after their death, or no longer
        admitted). Anyone may sign a member record for a fresh identity at an address where
        nobody listens: each one's backoff stayed for the life of the process."""
        for peer in [p for p in self._redial_at if p not in self._seen_bootstrap_ids]:
            if self.view.get(peer) is None:
                del self._redial_at[peer]

    async def _dial(self, info: PeerInfo) -> None:
        peer = str(info.peer_id)
        self.metrics["dials"] += 1
        forget_dial_failures(self.host, peer)  # we keep our own backoff per peer
        try:
            with trio.fail_after(5):
                await self.host.connect(info)
            self._redial_at.pop(peer, None)
            if self._swim is not None:
                self._swim.contact(peer, tuple(f"{a}/p2p/{peer}" for a in info.addrs))
        except Exception as exc:
            self.metrics["dial_failures"] += 1
            _, backoff = self._redial_at.get(peer, (0.0, 0.5))
            backoff = min(self.config.max_redial_backoff, backoff * 2)
            jitter = self._rng.uniform(0.8, 1.2)
            self._redial_at[peer] = (time.monotonic() + backoff * jitter, backoff)
            log.debug("dial %s failed (%s); retry in %.1fs", peer, exc, backoff * jitter)

    # -- fault injection -----------------------------------------------------------------
    async def isolate_from(self, peer_ids: set[str]) -> None:
        """Simulate a network partition: drop and refuse all traffic with `peer_ids` (gossip,
        streams, dials) until `heal()`. Both sides of a split should call it."""
        self._blocked |= set(peer_ids)
        for peer in peer_ids:
            if self._rpc is not None:
                self._rpc.forget_peer(peer)
            await self._disconnect(peer)

    def heal(self) -> None:
        self._blocked.clear()

    # -- misbehaviour --------------------------------------------------------------------
    def is_banned(self, peer: str) -> bool:
        return self.scores.is_banned(peer, time.monotonic())

    def _is_refused(self, peer: str) -> bool:
        """Whether nothing is served to or asked of `peer`: banned, or on the other side of
        an injected partition."""
        return peer in self._blocked or self.is_banned(peer)

    def _refuse_stream(self, peer: str) -> bool:
        if not self._is_refused(peer):
            return False
        self.metrics["banned_refused"] += peer not in self._blocked
        return True

    def _refuse_connection(self, peer: str) -> None:
        """A banned peer got through the door (it had to complete Noise for us to learn who
        it is): drop the connection at once. A peer the rule does not admit may stay
        connected within the cap on strangers (`_limit_strangers`), but under members-only
        gossip it gets no place in pubsub."""
        if (self._pubsub is not None and self._members_only_gossip()
                and not self.admits(peer)):
            self._pubsub.add_to_blacklist(ID.from_base58(peer))
        if self.is_banned(peer) and self._nursery is not None and not self._stopping:
            self.metrics["banned_refused"] += 1
            log.debug("refused a connection from banned peer %s", peer)
            self._nursery.start_soon(self._disconnect, peer)

    def _limit_strangers(self, peer: str, conn: INetConn) -> None:
        """Under a closed rule, peers the rule does not admit hold at most
        `max_stranger_connections` connections at once: a new one beyond that is closed (it
        had to complete Noise for us to learn who it is). The peer is neither scored nor
        banned, so it may come back once a slot is free; a node that staked and waits for
        the next reading of the stakes joins as soon as it is admitted. Admitted peers are
        never counted. While the stake rule has no first reading, nobody is admitted: those
        connections are counted but none is closed (the refusal would be our own doing)."""
        if (not self.admission.rule.closed or self.admits(peer) or self.is_banned(peer)
                or self._stopping or conn.is_closed):
            return
        held = self._stranger_connections()
        if (held < self.config.max_stranger_connections or not self.admission.settled
                or self._nursery is None):
            self._strangers[id(conn)] = (peer, conn, time.monotonic())
            return
        self.metrics["stranger_connections_closed"] += 1
        log.debug("closed a connection of %s: %d connections of peers the rule does not "
                  "admit are held already", peer, held)
        self._nursery.start_soon(self._close_connection, conn)

    def _stranger_connections(self) -> int:
        """How many connections peers the rule does not admit hold now (within the cap)."""
        self._forget_gone_strangers()
        return len(self._strangers)

    def _forget_gone_strangers(self) -> None:
        """Forget the strangers' connections that closed and those of peers admitted since
        (a new stake reading)."""
        for key, (peer, conn, _) in list(self._strangers.items()):
            if conn.is_closed or self.admits(peer):
                del self._strangers[key]

    def _expire_strangers(self, now: float) -> None:
        """A stranger's connection is a slot held for `stranger_connection_max_s` at most:
        then it is closed (the peer may connect again while a slot is free). A connection
        that died without this node noticing (no FIN, no RST) frees its slot so too."""
        if self._nursery is None or self._stopping or not self.admission.settled:
            return  # before the first stake reading nobody is admitted: nothing is closed
        self._forget_gone_strangers()
        for key, (peer, conn, since) in list(self._strangers.items()):
            if now - since < self.config.stranger_connection_max_s:
                continue
            del self._strangers[key]
            self.metrics["stranger_connections_expired"] += 1
            log.debug("closed a connection of %s, a peer the rule does not admit, after %.0f s",
                      peer, now - since)
            self._nursery.start_soon(self._close_connection, conn)

    def _stranger_gone(self, conn: INetConn) -> None:
        self._strangers.pop(id(conn), None)

    def _connection_gone(self, peer: str) -> None:
        """With a peer's last connection go the streams this node opened to it: they died
        with it, and a peer that never became a member (a stranger this node answered, say a
        SWIM ping from a fresh identity) would otherwise leave them in the table for the life
        of the process (a member's go when it is held dead). The next request opens anew.
        A member's are left to its membership: while it is alive, a connection it replaces
        may close after the new one carries requests, and those must not be reset."""
        if self._rpc is None or self._stopping or self.view.get(peer) is not None:
            return
        if any(not c.is_closed for c in
               self.host.get_network().get_connections(ID.from_base58(peer))):
            return
        self._rpc.forget_peer(peer)

    @staticmethod
    async def _close_connection(conn: INetConn) -> None:
        """Close one connection; it may have gone already (the peer hung up first)."""
        with trio.move_on_after(2.0):
            try:
                if not conn.is_closed:
                    await conn.close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)

    def _another_connection(self, peer: str, conn: INetConn) -> None:
        """A new connection with `peer` while this node holds another: the peer may have
        restarted after a crash that left its old connection open and silent here. Requests
        to it go on new streams, which the swarm opens on the newest connection
        (p2p/libp2p_fixes.py `use_newest_connections`), not on the streams of the old one."""
        if self._rpc is None:
            return
        others = [c for c in self.host.get_network().get_connections(ID.from_base58(peer))
                  if c is not conn and not c.is_closed]
        if others:
            self._rpc.retire_peer(peer)

    def _on_libp2p_fault(self, peer: str | None, where: str, error: BaseException) -> None:
        self.metrics["libp2p_faults"] += 1
        if peer is not None and peer != self.peer_id:
            self.penalize(peer, "fault")

    def penalize(self, peer: str, reason: str) -> None:
        """Lower the score of a peer that misbehaved; below the line it is banned."""
        if self.scores.penalize(peer, reason, time.monotonic()):
            log.warning("peer %s banned after repeated offences (last: %s)", peer, reason)
            if self._pubsub is not None:
                self._pubsub.add_to_blacklist(ID.from_base58(peer))
            if self._nursery is not None:
                self._nursery.start_soon(self._disconnect, peer)

    async def _reset_silent_peers(self, now: float) -> None:
        """Repair gossip with connected peers we do not hear from, without dropping a
        connection that carries requests. py-libp2p can keep a stale pubsub stream for a peer
        that restarted or reconnected, or hold no subscription of it; then it is not counted
        as a listener although it is connected. Its pubsub stream is rebuilt (which makes the
        peer announce its subscriptions again: p2p/libp2p_fixes.py), once per grace period
        while it stays unheard. A connected member the membership view holds dead is
        reconciled with at once (a healed partition). The connection is dropped only when a
        repair did not help and the view does not hold the peer alive: requests do not reach
        it either (a dead peer's half-open connection), so a redial can only help. A member
        the view holds alive answers requests, and the store's reads and writes run on that
        connection: dropping it would break them, and the redial races py-libp2p's own
        cleanup into the same silence (seen on a testnet as reconnects every 5 s after a
        heal)."""
        assert self._pubsub is not None
        connected = set(self.connected_peers())
        for peer in list(self._connected_since):
            if peer not in connected:
                del self._connected_since[peer]
        topic = self._topic(MEMBERSHIP_TOPIC)
        listeners = {str(p) for p in self._pubsub.peer_topics.get(topic, ())}
        grace = max(3.0, 4 * self.heartbeat_every())
        for peer in connected - self._blocked:
            if self._members_only_gossip() and not self.admits(peer):
                continue  # kept out of pubsub on purpose: never heard there
            since, strikes = self._connected_since.setdefault(peer, (now, 0))
            member = self.view.get(peer)
            held_dead = member is not None and member.state is MemberState.DEAD
            heard = peer in listeners and registered_stream_is_live(self._pubsub,
                                                                  ID.from_base58(peer))
            if heard and not held_dead:
                self._connected_since[peer] = (now, 0)
                continue
            if now - since < grace:
                continue
            self._connected_since[peer] = (now, strikes + 1)
            alive = member is not None and member.state is MemberState.ALIVE
            if strikes and not alive:
                log.info("not hearing %s for %.0fs while connected, nor holding it alive; "
                         "reconnecting", peer, now - since)
                self.metrics["silent_disconnects"] += 1
                await self._disconnect(peer)
                continue
            if held_dead and member is not None and self._swim is not None:
                log.info("holding %s dead for %.0fs while connected; reconciling membership",
                         peer, now - since)
                self._swim.contact(peer, member.addrs)
            if not heard:
                log.info("not hearing %s for %.0fs while connected; rebuilding its gossip "
                         "stream", peer, now - since)
                self.metrics["silent_rebuilds"] += 1
                self._rebuild_pubsub_stream(peer)

    def _rebuild_pubsub_stream(self, peer: str) -> None:
        """Drop our pubsub stream to `peer` and the subscriptions we hold of it; py-libp2p
        opens a new stream while connected, and the peer, seeing it, announces its
        subscriptions again. The old stream is reset so that the peer stops reading it."""
        assert self._pubsub is not None
        peer_id = ID.from_base58(peer)
        old = self._pubsub.peers.get(peer_id)
        self._pubsub._handle_dead_peer(peer_id)
        if old is not None and self._nursery is not None and not self._stopping:
            self._nursery.start_soon(self._reset_stream, old)

    @staticmethod
    async def _reset_stream(stream: INetStream) -> None:
        with trio.move_on_after(1.0):
            try:
                await stream.reset()
            except Exception:
                log.debug("reset of an old pubsub stream failed", exc_info=True)

    def _lift_expired_bans(self, now: float) -> None:
        """Take off pubsub's blacklist the peers whose ban ended, unless members-only
        gossip keeps them out while connected: a peer the rule does not admit is listed again
        at each connection (`_refuse_connection`), so it leaves the list once it has none
        (every stranger ever connected stayed listed for the life of the process)."""
        if self._pubsub is None:
            return
        connected = {str(p) for p in self.host.get_connected_peers()}
        for peer_id in self._pubsub.get_blacklisted_peers():
            peer = str(peer_id)
            if not self.scores.is_banned(peer, now) and (
                    not self._members_only_gossip() or self.admits(peer)
                    or peer not in connected):
                self._pubsub.remove_from_blacklist(peer_id)

    async def _disconnect(self, peer: str) -> None:
        try:
            await self.host.disconnect(ID.from_base58(peer))
        except Exception:
            log.debug("disconnect of %s failed", peer, exc_info=True)
