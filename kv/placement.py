# Where keys live, as this node sees it: the ring kept in step with membership, and what
# follows from it for one moment's live members.
# Lives here: ring members (admitted, not left), the ring rebuilt when they change, live
# members, a key's live replicas (this node first), the number of copies quorums count over,
# the partitions this node owns and those it shares with a peer (cached per ring).
# Must not live here: the ring's arithmetic (shard/ring.py), membership itself (p2p/), what
# is sent where (kv/writes.py, kv/repair.py, kv/handoff.py).
from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from p2p import Network
from shard import Ring

from .config import KVConfig

log = logging.getLogger(__name__)


class Placement:
    """The ring of one KV node and the views of it the other rooms ask for."""

    def __init__(self, net: Network, config: KVConfig) -> None:
        self.net = net
        self.config = config
        self.me = net.peer_id
        self.ring = self.build_ring()
        self._shared_cache: tuple[Ring | None, dict[str, frozenset[int]]] = (None, {})

    def ring_members(self) -> set[str]:
        """Members that hold data: everyone known except those who left on purpose. A node
        that crashed stays in the ring (its writes wait in hints) until it is forgotten.
        The view holds admitted peers only; this node is a member if the rule admits it
        (or when it knows nobody else: a ring needs one member, and refusals elsewhere keep
        a node the network does not admit from holding anyone's data)."""
        others = {m.peer_id for m in self.net.view.members() if not m.left}
        if self.net.admits(self.me) or not others:
            others.add(self.me)
        return others

    def build_ring(self) -> Ring:
        return Ring(sorted(self.ring_members()), partitions=self.config.partitions,
                    replicas=self.config.replicas)

    def copies(self) -> int:
        """How many replicas each key has: N, or every ring member while the ring has fewer
        than N (a one-node network keeps one copy and accepts writes, as Riak's one-node
        cluster does); quorums count over these. Handoff brings keys up to N as members
        join."""
        return min(self.config.replicas, len(self.ring.members))

    def alive(self) -> set[str]:
        return {self.me} | self.net.view.alive_ids()

    def alive_replicas(self, key: bytes, alive: set[str] | None = None) -> list[str]:
        """The live replicas of `key` in preference order, this node first (no round trip)."""
        if alive is None:
            alive = self.alive()
        replicas = [p for p in self.ring.preference_list(key) if p in alive]
        if self.me in replicas:
            replicas.remove(self.me)
            replicas.insert(0, self.me)
        return replicas

    def _ring_cache(self) -> dict[str, frozenset[int]]:
        """Partition sets derived from the current ring, computed once per ring."""
        if self._shared_cache[0] is not self.ring:
            self._shared_cache = (self.ring, {})
        return self._shared_cache[1]

    def owned_partitions(self) -> frozenset[int]:
        cache = self._ring_cache()
        if self.me not in cache:
            cache[self.me] = frozenset(self.ring.partitions_of(self.me))
        return cache[self.me]

    def shared_partitions(self, peer: str) -> frozenset[int]:
        """The partitions both this node and `peer` replicate."""
        cache = self._ring_cache()
        if peer not in cache:
            cache[peer] = self.owned_partitions() & self.ring.partitions_of(peer)
        return cache[peer]

    async def run(self, on_change: Callable[[Ring, Ring], None]) -> None:
        """Rebuild the ring whenever its members change; `on_change(old, new)` after each."""
        while True:
            members = self.ring_members()
            if members != set(self.ring.members):
                old, self.ring = self.ring, self.build_ring()
                log.info("ring rebuilt: %d members (was %d)", len(self.ring.members),
                         len(old.members))
                on_change(old, self.ring)
            await trio.sleep(min(0.5, self.config.rebalance_interval))
