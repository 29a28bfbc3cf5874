# The tombstone sweep of one KV node: finds old register tombstones in the partitions it owns,
# asks every replica of each what it holds, and removes the local record once the policy
# (kv/tombstones.py) allows it. Every replica runs its own sweep over its own copy.
# Lives here: the sweep loop and its pacing (a bounded number of keys read per round, a cursor
# that walks the owned partitions), the calm-cluster precondition, the
# batched question to the replicas, and the conditional delete through the group-commit writer.
# Must not live here: the collection rule itself (kv/tombstones.py), storage layout (shard/).
from __future__ import annotations

import logging
import time

import trio

from p2p import Network, RequestError
from shard import Ring, Store

from .config import KVConfig
from .handoff import FOREIGN_PROTOCOL, Handoff
from .hints import wall_ms
from .placement import Placement
from .reads import READ_CHUNK, Reads
from .tombstones import Verdict, decide, is_candidate
from .writer import GroupCommitWriter

log = logging.getLogger(__name__)


class TombstoneSweeper:
    """Collects this node's copies of register tombstones that every replica confirmed."""

    def __init__(self, net: Network, store: Store, writer: GroupCommitWriter,
                 placement: Placement, reads: Reads, handoff: Handoff, config: KVConfig,
                 metrics: dict[str, int]) -> None:
        self.net = net
        self.store = store
        self.writer = writer
        self.placement = placement
        self.reads = reads
        self.handoff = handoff
        self.config = config
        self.metrics = metrics
        self._cursor = 0  # the next partition to read
        self._ring: Ring | None = None
        self._calm_since: float | None = None
        self.rounds = 0  # rounds run (calm or not), for status and tests

    async def run(self) -> None:
        while True:
            await trio.sleep(self.config.tombstone_sweep_interval)
            self.rounds += 1
            if self.calm(time.monotonic()):
                await self.sweep_once(wall_ms())

    def calm(self, now: float) -> bool:
        """True once the ring has been the same, with every member alive, and this node has
        had nothing to hand off, for `tombstone_settle_s`: by then a member that came back has
        received its hints and handed its foreign partitions to their owners, so an older
        write it held has reached the replicas the sweep asks."""
        ring = self.placement.ring
        steady = (ring is self._ring and set(ring.members) <= self.placement.alive()
                  and not self.handoff.progress)
        if not steady:
            self._ring, self._calm_since = ring, None
            return False
        if self._calm_since is None:
            self._calm_since = now
        return now - self._calm_since >= self.config.tombstone_settle_s

    async def sweep_once(self, now_ms: int) -> int:
        """One round: read up to `tombstone_scan_keys` keys, settle the candidates found;
        returns how many tombstones were removed here."""
        ring = self.placement.ring
        candidates = await self._scan(now_ms)
        if not candidates:
            return 0
        answers = await self._ask(ring, [key for key, _ in candidates])
        collect: list[tuple[bytes, bytes]] = []
        for (key, tombstone), answer in zip(candidates, answers, strict=True):
            verdict = decide(tombstone, ring.preference_list(key), answer)
            if verdict is Verdict.COLLECT:
                collect.append((key, tombstone))
            elif verdict is Verdict.REPAIR:  # send the tombstone to the stale replicas
                self.reads.merge_and_repair(key, dict(answer))
        if not collect:
            return 0
        held_elsewhere = await self._foreign_anywhere(ring)
        if held_elsewhere is None:
            return 0
        collect = [(k, t) for k, t in collect if ring.partition_of(k) not in held_elsewhere]
        if not collect:
            return 0

        def delete_unchanged() -> int:
            # between two write batches: a write that landed since the question keeps its key
            if self.placement.ring is not ring:
                return 0
            return len(self.store.delete_if(collect, sync=False))

        collected: int = await self.writer.exclusive(delete_unchanged)
        self.metrics["tombstones_collected"] += collected
        if collected:
            log.info("collected %d tombstones confirmed by every replica", collected)
        return collected

    async def _scan(self, now_ms: int) -> list[tuple[bytes, bytes]]:
        """Tombstones older than the grace period, from the next owned partitions (one range
        read each, skipped cheaply when not owned or empty), until the key budget is spent or
        every partition was looked at once; yields to other tasks between partitions."""
        store, owned = self.store, self.placement.owned_partitions()
        partitions = store.keyspace.partitions
        grace_ms = int(self.config.tombstone_grace_s * 1000)
        budget = self.config.tombstone_scan_keys
        found: list[tuple[bytes, bytes]] = []
        for _ in range(partitions):
            if budget <= 0:
                break
            partition, self._cursor = self._cursor, (self._cursor + 1) % partitions
            if partition not in owned or not store.count(partition):
                continue
            budget -= store.count(partition)
            found.extend((k, s) for k, s in store.iterate(partition)
                         if is_candidate(s, now_ms, grace_ms))
            await trio.lowlevel.checkpoint()
        return found

    async def _foreign_anywhere(self, ring: Ring) -> set[int] | None:
        """Partitions some member still has to hand off (an old owner that missed the delete
        would bring the old value back after a collection), or None if a member did not say.
        Asked after the replicas answered: a handoff that ends in between has delivered its
        states to the replicas, whose answers then already counted them."""
        held: set[int] = set(self.handoff.foreign_partitions())
        silent = False

        async def ask(member: str) -> None:
            nonlocal silent
            try:
                reply = await self.net.request(member, FOREIGN_PROTOCOL, {},
                                             timeout=self.config.request_timeout)
            except RequestError as exc:
                log.info("tombstone sweep: %s did not say what it still hands off: %s",
                         member, exc)
                silent = True
                return
            if not isinstance(reply, list) or not all(isinstance(p, int) for p in reply):
                silent = True
                return
            held.update(reply)

        async with trio.open_nursery() as nursery:
            for member in ring.members:
                if member != self.placement.me:
                    nursery.start_soon(ask, member)
        return None if silent else held

    async def _ask(self, ring: Ring, keys: list[bytes]) -> list[dict[str, bytes | None]]:
        """What every replica of each key holds; a replica that does not answer for a key
        (failed, timed out, reply too large, malformed) is absent from that key's answers."""
        answers: list[dict[str, bytes | None]] = [{} for _ in keys]
        wanted: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            for peer in ring.preference_list(key):
                wanted.setdefault(peer, []).append(index)

        async def ask(peer: str, indices: list[int]) -> None:
            states = await self.reads.read_states(peer, [keys[i] for i in indices])
            if states is None:
                return
            for i, state in zip(indices, states, strict=True):
                if state is None or isinstance(state, bytes):  # False: did not fit
                    answers[i][peer] = state

        async with trio.open_nursery() as nursery:
            for peer, indices in wanted.items():
                for start in range(0, len(indices), READ_CHUNK):
                    nursery.start_soon(ask, peer, indices[start:start + READ_CHUNK])
        return answers
