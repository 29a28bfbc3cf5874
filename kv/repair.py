# Background repair: what the write path could not deliver at once, and what replicas missed.
# Lives here: the hint loop (expiry of old hints, delivery to targets that are back, oldest
# first, a refused batch bisected down to the hint that cannot go), anti-entropy rounds (one
# peer per round, partitions still being written put off: shard/quiet.py), the repair of
# every owned partition at once after this node lost data, the anti-entropy handler, and the
# clock skew bound on what anti-entropy offers and takes.
# Must not live here: the Merkle exchange itself (shard/antientropy.py), partition handoff
# (kv/handoff.py), the read repair of one key (kv/reads.py).
from __future__ import annotations

import logging
import time
from typing import Any

import trio

from p2p import Network, RemoteError, RequestError
from p2p.rpc import HandlerError
from shard import Initiator, ProtocolError, QuietPartitions, Responder, Store

from .config import KVConfig
from .hints import HintStore
from .placement import Placement
from .replication import APPLY_PROTOCOL, fits_frame, seal_batch
from .timebound import TimeBound, refused_indices, wall_ms
from .writes import Writes

log = logging.getLogger(__name__)

AE_PROTOCOL = "kv-ae"
MAX_AE_SESSIONS_PER_PEER = 4
# an anti-entropy session whose initiator sent nothing for this long was given up (its
# requests time out after 4 request timeouts): it goes when the next session starts
AE_SESSION_IDLE_S = 120.0
REPAIR_WINDOW_S = 300.0  # how long a repair after data loss waits for replicas to compare with
REPAIR_POLL_S = 0.5  # how often it looks for live replicas it has not compared with yet


class Repair:
    """Hint delivery and anti-entropy of one KV node."""

    def __init__(self, net: Network, store: Store, hints: HintStore, placement: Placement,
                 writes: Writes, config: KVConfig, metrics: dict[str, int],
                 timebound: TimeBound) -> None:
        self.net = net
        self.store = store
        self.hints = hints
        self.placement = placement
        self.writes = writes
        self.config = config
        self.metrics = metrics
        self.timebound = timebound
        self.me = net.peer_id
        self.last_anti_entropy: dict[int, float] = {}
        self.quiet = QuietPartitions(config.anti_entropy_max_deferrals)
        self._ae_sessions: dict[tuple[str, int], tuple[Responder, float]] = {}
        self._ae_next_sid = 0

    # -- hinted handoff delivery ---------------------------------------------------------
    async def hint_loop(self) -> None:
        while True:
            await trio.sleep(self.config.hint_interval)
            alive = self.placement.alive()
            for target in self.hints.targets():
                expired = self.hints.expire(target, int(self.config.hint_ttl_s * 1000))
                if expired:
                    self.metrics["hints_expired"] += expired
                    log.warning("dropped %d hints for %s older than %s s; anti-entropy will "
                                "repair it", expired, target, self.config.hint_ttl_s)
                if target in alive and target != self.me:
                    await self.deliver_hints(target)

    async def deliver_hints(self, target: str) -> None:
        """Deliver the hints for `target`, oldest first, until none are left or it stops
        answering. No hint blocks the ones behind it: one that alone is larger than a batch
        goes alone, and one that can never be delivered (larger than a frame, or refused by
        the target) is dropped with a warning; anti-entropy is then its repair path."""
        while True:
            hints = self.hints.take(target, self.config.max_batch, self.config.max_batch_bytes)
            if not hints:
                return
            if not await self._deliver_hint_batch(target, hints):
                return
            log.info("delivered %d hinted writes to %s (%d left)", len(hints), target,
                     self.hints.pending().get(target, 0))

    async def _deliver_hint_batch(self, target: str,
                                  hints: list[tuple[bytes, bytes, bytes]]) -> bool:
        """Send `hints` in one batch, or, if the target refuses it, in halves down to the one
        it refuses (dropped); False when the target could not be reached (kept for later)."""
        sealed = seal_batch(self.net, [[key, delta, None] for _, key, delta in hints],
                            self.writes.next_batch_seq())
        why = ""
        if not fits_frame(self.net, sealed):
            why = f"{len(sealed)} bytes sealed do not fit in a frame"
        else:
            try:
                reply = await self.net.request(target, APPLY_PROTOCOL, sealed,
                                               timeout=self.config.request_timeout)
            except RemoteError as exc:
                if exc.code != "refused":
                    log.info("hint delivery to %s failed: %s", target, exc)
                    return False
                why = f"refused: {exc.message}"
            except RequestError as exc:
                log.info("hint delivery to %s failed: %s", target, exc)
                return False
        if not why:
            refused = refused_indices(reply, len(hints))
            if refused:  # delivered, and refused there: retrying would be refused again
                log.info("%s refused %d hinted writes (beyond its clock skew bound); dropped",
                         target, len(refused))
            self.hints.remove(target, [hint_id for hint_id, _, _ in hints])
            self.metrics["hints_delivered"] += len(hints) - len(refused)
            self.metrics["hints_dropped"] += len(refused)
            return True
        if len(hints) > 1:
            half = len(hints) // 2
            return (await self._deliver_hint_batch(target, hints[:half])
                    and await self._deliver_hint_batch(target, hints[half:]))
        self.hints.remove(target, [hints[0][0]])
        self.metrics["hints_dropped"] += 1
        log.warning("dropped a hint for %s (key %r) that can never be delivered (%s); "
                    "anti-entropy will repair it", target, hints[0][1][:64], why)
        return True

    # -- anti-entropy --------------------------------------------------------------------
    async def anti_entropy_loop(self) -> None:
        """Each round compares this node's shared partitions with one other replica, taking
        the peers in turn; a session costs time in the number of partitions, so one per
        round keeps the load flat. Partitions being written as the round starts wait (at
        most a few rounds: see shard/quiet.py)."""
        placement = self.placement
        turn = 0
        interval = self.config.anti_entropy_interval
        settle = min(self.config.anti_entropy_settle_s, interval / 2)
        while True:
            await trio.sleep(interval - settle)
            roots_before = self.store.tree.partition_roots()
            await trio.sleep(settle)
            alive = placement.alive()
            peers = [p for p in sorted(placement.ring.members) if p != self.me and p in alive]
            if not peers:
                continue
            turn += 1
            peer = peers[turn % len(peers)]
            self.quiet.retain(peers, placement.owned_partitions())
            due = self.quiet.due(peer, placement.shared_partitions(peer), roots_before,
                                 self.store.tree.partition_roots())
            if due:
                await self.anti_entropy_with(peer, due)

    async def repair_at_once(self, window: float = REPAIR_WINDOW_S) -> None:
        """After this node's store lost data (or may have: an unclean stop), compare every
        owned partition with every live replica sharing it now, all peers at once, rather
        than one peer per anti-entropy round. Peers are taken as membership finds them; done
        once every owned partition was compared and no live replica is left to compare with,
        or after `window` seconds (the periodic rounds go on in any case)."""
        placement = self.placement
        compared: dict[str, frozenset[int]] = {}
        received = 0
        started = time.monotonic()

        async def compare(peer: str, partitions: frozenset[int]) -> None:
            nonlocal received
            began = time.monotonic()
            got = await self.anti_entropy_with(peer, partitions)
            if all(self.last_anti_entropy.get(p, -1.0) >= began for p in partitions):
                compared[peer] = compared.get(peer, frozenset()) | partitions
                received += got
                owned = placement.owned_partitions()
                done = len(owned & frozenset().union(*compared.values()))
                log.warning("repair: compared %d partitions with %s; %d of %d owned partitions "
                            "compared, %d states received", len(partitions), peer, done,
                            len(owned), received)

        with trio.move_on_after(window) as scope:
            while True:
                alive = placement.alive()
                work = {peer: left for peer in sorted(placement.ring.members)
                        if peer != self.me and peer in alive
                        and (left := placement.shared_partitions(peer)
                             - compared.get(peer, set()))}
                owned = placement.owned_partitions()
                if not work and compared and owned <= frozenset().union(*compared.values()):
                    break
                async with trio.open_nursery() as nursery:
                    for peer, partitions in work.items():
                        nursery.start_soon(compare, peer, partitions)
                await trio.sleep(REPAIR_POLL_S)
        if scope.cancelled_caught:
            log.warning("repair: not every owned partition was compared within %.0f s (%d states "
                        "received); periodic anti-entropy goes on", window, received)
        else:
            log.warning("repair: done in %.1f s: every owned partition compared with its live "
                        "replicas, %d states received", time.monotonic() - started, received)

    async def anti_entropy_with(self, peer: str, partitions: frozenset[int]) -> int:
        """Compare the given partitions with `peer` and repair both sides; returns the number
        of states this side received."""
        self._ae_next_sid += 1
        sid = self._ae_next_sid
        session = Initiator(self.store.tree, self.offered_segment, partitions)
        message: Any = session.start()
        try:
            while message is not None:
                reply = await self.net.request(peer, AE_PROTOCOL, {"sid": sid, "m": message},
                                               timeout=self.config.request_timeout * 4)
                if reply is None:
                    break
                message = session.receive(reply)
        except (RequestError, ProtocolError) as exc:
            log.info("anti-entropy with %s failed: %s", peer, exc)
            return 0
        repaired = self._within_bound(self._owned_only(session.received), peer, "anti-entropy")
        if repaired and await self.writes.merge_quietly(repaired, f"anti-entropy with {peer}"):
            log.info("anti-entropy with %s repaired %d keys here", peer, len(repaired))
        self.quiet.compared(peer, partitions)
        now = time.monotonic()
        for partition in partitions:
            self.last_anti_entropy[partition] = now
        return len(session.received)

    async def on_anti_entropy(self, peer: str, message: Any) -> Any:
        """One step of an anti-entropy session a peer runs with this node (kv-ae)."""
        if not isinstance(message, dict) or not isinstance(message.get("sid"), int):
            raise HandlerError("bad_request", "anti-entropy message needs sid and m")
        key = (peer, message["sid"])
        entry = self._ae_sessions.get(key)
        now = time.monotonic()
        if entry is None:
            self._forget_idle_sessions(now)
            mine = [k for k in self._ae_sessions if k[0] == peer]
            if len(mine) >= MAX_AE_SESSIONS_PER_PEER:
                del self._ae_sessions[min(mine, key=lambda k: self._ae_sessions[k][1])]
            entry = (Responder(self.store.tree, self.offered_segment), now)
        session = entry[0]
        self._ae_sessions[key] = (session, now)
        try:
            reply = session.receive(message.get("m"))
        except ProtocolError as exc:
            self._ae_sessions.pop(key, None)
            self.net.penalize(peer, "malformed")
            raise HandlerError("protocol", str(exc)) from None
        if session.done:
            self._ae_sessions.pop(key, None)
            repaired = self._within_bound(self._owned_only(session.received), peer,
                                          "anti-entropy")
            if repaired:
                await self.writes.merge_quietly(repaired, f"anti-entropy from {peer}")
        return reply

    def _forget_idle_sessions(self, now: float) -> None:
        """Drop the sessions their initiators gave up (idle past AE_SESSION_IDLE_S): a peer
        that sent one step and left (a member since gone, or under the open rule a fresh
        identity per connection) kept up to MAX_AE_SESSIONS_PER_PEER of them, each a
        snapshot of the tree, for the life of the process."""
        idle = [key for key, (_, last) in self._ae_sessions.items()
                if now - last > AE_SESSION_IDLE_S]
        for key in idle:
            del self._ae_sessions[key]

    def offered_segment(self, partition: int, segment: int) -> list[tuple[bytes, bytes]]:
        """A segment as anti-entropy offers it: without states beyond the clock skew bound
        (stored before the bound existed). Peers would refuse them and score this node down;
        here they read as absent until an operator overrides them."""
        now_ms = wall_ms()
        beyond = self.timebound.beyond_or_false
        return [(k, s) for k, s in self.store.read_segment(partition, segment)
                if not beyond(s, now_ms)]

    def _within_bound(self, states: list[tuple[bytes, bytes]], peer: str, what: str
                      ) -> list[tuple[bytes, bytes]]:
        """The states from `peer` within the clock skew bound; the others are refused,
        counted and logged, and the peer is scored down once. (A malformed state passes: the
        merge reports it.)"""
        now_ms = wall_ms()
        beyond = self.timebound.beyond_or_false
        kept = [(k, s) for k, s in states if not beyond(s, now_ms)]
        if len(kept) < len(states):
            refused = len(states) - len(kept)
            self.metrics["skew_refused"] += refused
            self.net.penalize(peer, "clock_skew")
            self.timebound.report(refused, f"in {what} with", peer)
        return kept

    def _owned_only(self, states: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """States of keys this node replicates now. An exchange that began under an older
        ring must not bring back a partition this node has since handed off."""
        mine = self.placement.owned_partitions()
        partition_of = self.placement.ring.partition_of
        return [(k, s) for k, s in states if partition_of(k) in mine]
