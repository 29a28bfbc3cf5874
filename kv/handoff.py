# Partition handoff after ring changes: moving each partition to the nodes that newly own it
# and dropping it where it no longer belongs.
# Lives here: who sends which partition to a newcomer (the owner that left the partition's
# preference list, else the first owner that stayed), the cheap check that an owner already
# holds a partition (its partition root equals ours), pipelined chunk streams, and the drop of a
# partition once every owner confirmed it and no write raced the transfer. States beyond the
# clock skew bound (stored before the bound existed) are not sent: the target would refuse
# them and score this node down; they read as absent, and go with the partition's drop.
# Must not live here: the write path, storage internals (shard/), the wire format of replication
# batches (replication.py), the ring itself (kv/placement.py keeps it in step with membership).
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from p2p import Network, RequestError
from p2p.rpc import HandlerError
from shard import Ring, Store, diff

from .config import KVConfig
from .placement import Placement
from .replication import APPLY_PROTOCOL, seal_batch
from .timebound import TimeBound, refused_indices, wall_ms
from .writer import GroupCommitWriter

log = logging.getLogger(__name__)

ROOTS_PROTOCOL = "kv-roots"
FOREIGN_PROTOCOL = "kv-foreign"
CHUNK_KEYS = 4096  # keys per handoff batch (and at most max_batch_bytes)
IN_FLIGHT = 3  # handoff batches awaiting their reply, per target


class Handoff:
    """The handoff work of one KV node: pushes to newcomers planned at ring changes, and the
    partitions this node holds but no longer owns."""

    def __init__(self, net: Network, store: Store, writer: GroupCommitWriter,
                 placement: Placement, config: KVConfig, metrics: dict[str, int],
                 timebound: TimeBound, next_batch_seq: Callable[[], int]) -> None:
        self.net = net
        self.store = store
        self.writer = writer
        self.placement = placement
        self.config = config
        self.metrics = metrics
        self.timebound = timebound
        self.next_batch_seq = next_batch_seq
        # (partition, newcomer) -> owners that left the partition and will send it themselves
        self.pushes: dict[tuple[int, str], tuple[str, ...]] = {}
        self.progress: dict[str, Any] = {}
        self._wake = trio.Event()

    # -- planning --------------------------------------------------------------------------
    def plan(self, old: Ring, new: Ring) -> None:
        """After a ring change, decide who fills each newcomer of a partition, so that every
        moved partition travels once: an owner that left the preference list but is still in
        the ring hands it off anyway (it must, before it may drop it), so it sends; only when
        there is none (the ring grew past fewer than N nodes, or an owner was removed) does
        the first owner that stayed push it."""
        if len(self.store):
            for partition, (before, after) in diff(old, new).items():
                if not self.store.count(partition):
                    continue
                staying = [p for p in before if p in after]
                if not staying or staying[0] != self.placement.me:
                    continue
                leaving = tuple(p for p in before if p not in after and p in new.members)
                for newcomer in after:
                    if newcomer not in before:
                        self.pushes[(partition, newcomer)] = leaving
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.config.rebalance_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            alive = self.placement.alive()
            await self._push_to_newcomers(alive)
            await self._hand_off_foreign(alive)

    async def _push_to_newcomers(self, alive: set[str]) -> None:
        """Pushes this node is responsible for: a newcomer that already holds what this node
        holds (equal partition roots) needs nothing; otherwise the partition is sent unless
        an owner that left it is alive to send it."""
        by_newcomer: dict[str, list[int]] = {}
        for partition, newcomer in sorted(self.pushes):
            if (newcomer not in self.placement.ring.owners(partition)
                    or not self.store.count(partition)):
                self.pushes.pop((partition, newcomer), None)
            elif newcomer in alive:
                by_newcomer.setdefault(newcomer, []).append(partition)
        for newcomer, partitions in by_newcomer.items():
            differ = await self._differing(newcomer, partitions)
            if differ is None:
                continue
            for partition in set(partitions) - set(differ):
                self.pushes.pop((partition, newcomer), None)
            mine = [p for p in differ
                    if not any(o in alive for o in self.pushes.get((p, newcomer), ()))]
            if mine:
                await self._stream(newcomer, mine, self._pushed)

    def _pushed(self, newcomer: str, partition: int) -> None:
        self.pushes.pop((partition, newcomer), None)

    # -- partitions this node no longer owns -------------------------------------------------
    async def _hand_off_foreign(self, alive: set[str]) -> None:
        """Partitions held here that this node no longer owns go to those of their owners
        that do not hold them already (all owners at once, one pipelined stream each), then
        are dropped, each once every owner confirmed and no write raced the transfer."""
        foreign = self.foreign_partitions()
        if not foreign:
            self.progress = {}
            return
        keys = sum(self.store.count(p) for p in foreign)
        self.progress = {"partitions_left": len(foreign), "keys_left": keys, "keys_sent": 0}
        log.info("handoff: %d partitions (%d keys) this node no longer owns", len(foreign), keys)
        owners = {p: self.placement.ring.owners(p) for p in foreign}
        ready = [p for p in foreign if all(o in alive for o in owners[p])]
        per_target: dict[str, list[int]] = {}
        for partition in ready:  # every owner must be able to confirm before a drop
            for owner in owners[partition]:
                per_target.setdefault(owner, []).append(partition)
        # taken before any owner is asked: a write after this point makes the drop wait
        roots = {p: self.store.tree.partition_root(p) for p in ready}
        confirmed: dict[int, int] = dict.fromkeys(ready, 0)
        drops, droppable = trio.open_memory_channel[int](len(ready) + 1)
        dropped = 0

        def confirm(target: str, partition: int) -> None:
            confirmed[partition] += 1
            if confirmed[partition] == len(owners[partition]):
                drops.send_nowait(partition)

        async def send(target: str, partitions: list[int]) -> None:
            differ = await self._differing(target, partitions, roots)
            if differ is None:
                return
            for partition in set(partitions) - set(differ):
                confirm(target, partition)
            if differ:
                await self._stream(target, differ, confirm)

        async def drop_confirmed() -> None:
            nonlocal dropped
            async with droppable:
                async for first in droppable:
                    batch = [first]
                    while True:
                        try:
                            batch.append(droppable.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    done = await self.writer.exclusive(partial(self._drop_unchanged, batch, roots))
                    dropped += done
                    self.metrics["partitions_dropped"] += done
                    self.progress["partitions_left"] = len(foreign) - dropped

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drop_confirmed)
            async with drops, trio.open_nursery() as senders:
                for target, partitions in per_target.items():
                    senders.start_soon(send, target, partitions)
        log.info("handoff: %d partitions confirmed by their owners and dropped; %d left",
                 dropped, len(foreign) - dropped)
        if dropped == len(foreign) and not self.foreign_partitions():
            self.progress = {}  # done: say so now, not one round later

    def _drop_unchanged(self, partitions: list[int], roots: dict[int, int]) -> int:
        """Drop the partitions unchanged since `roots` was taken and still not owned here.
        Runs between two write batches (writer.exclusive): nothing lands between the check
        and the drop. One synced write at the end covers the whole batch of drops."""
        unchanged = [p for p in partitions
                     if self.store.tree.partition_root(p) == roots[p]
                     and self.placement.me not in self.placement.ring.owners(p)]
        for i, partition in enumerate(unchanged):
            self.store.drop_partition(partition, sync=i == len(unchanged) - 1)
        return len(unchanged)

    # -- wire --------------------------------------------------------------------------------
    async def _differing(self, target: str, partitions: list[int],
                         roots: dict[int, int] | None = None) -> list[int] | None:
        """The partitions whose root at `target` differs from ours (`roots`, or the current
        ones); None if the target could not be asked. Equal roots mean the target durably
        holds every state this node holds of the partition."""
        try:
            theirs = await self.net.request(target, ROOTS_PROTOCOL, {"p": partitions},
                                            timeout=self.config.request_timeout)
        except RequestError as exc:
            log.info("handoff: roots from %s failed: %s", target, exc)
            return None
        if not isinstance(theirs, list) or len(theirs) != len(partitions):
            log.info("handoff: %s answered a malformed roots reply", target)
            return None
        mine = roots if roots is not None else {
            p: self.store.tree.partition_root(p) for p in partitions}
        return [p for p, root in zip(partitions, theirs, strict=True) if root != mine[p]]

    def foreign_partitions(self) -> list[int]:
        """Partitions this node holds data of but no longer owns (still to hand off)."""
        mine = self.placement.owned_partitions()
        return [p for p in range(self.placement.ring.partitions)
                if p not in mine and self.store.count(p)]

    async def on_foreign(self, peer: str, message: Any) -> Any:
        """The partitions this node still has to hand off (the tombstone sweep of other
        nodes asks: an old owner's copy could bring a collected key back)."""
        return self.foreign_partitions()

    async def on_roots(self, peer: str, message: Any) -> Any:
        """A peer asks for our partition roots (to learn whether we hold what it holds)."""
        store = self.store
        wanted = message.get("p") if isinstance(message, dict) else None
        if (not isinstance(wanted, list) or len(wanted) > store.keyspace.partitions
                or not all(type(p) is int and 0 <= p < store.keyspace.partitions
                           for p in wanted)):
            raise HandlerError("bad_request", "roots needs a list of partition numbers")
        return [store.tree.partition_root(p) for p in wanted]

    async def _stream(self, target: str, partitions: list[int],
                      on_done: Callable[[str, int], None]) -> None:
        """Send every state of `partitions` to `target` in signed batches, IN_FLIGHT at a
        time; `on_done(target, partition)` once every batch carrying the partition was
        merged durably there (a partition not confirmed is sent again next round). States
        beyond the clock skew bound are left out, counted and logged once per partition: the
        partition counts as handed off without them."""
        window = trio.Semaphore(IN_FLIGHT)
        failed = False
        acked: set[int] = set()
        next_unacked = 1  # every batch before this one is acked
        finished: deque[tuple[int, int]] = deque()  # (last batch carrying it, partition)
        sent = 0  # batches started

        async def send(seq: int, items: list[list[Any]]) -> None:
            nonlocal failed, next_unacked
            try:
                batch = seal_batch(self.net, items, self.next_batch_seq())
                reply = await self.net.request(target, APPLY_PROTOCOL, batch,
                                               timeout=self.config.request_timeout * 4)
            except RequestError as exc:
                if not failed:
                    log.info("handoff to %s failed: %s", target, exc)
                failed = True
                return
            finally:
                window.release()
            refused = refused_indices(reply, len(items))
            if refused:  # states beyond the target's clock skew bound: they stay behind
                log.info("handoff: %s refused %d states beyond its clock skew bound",
                         target, len(refused))
            self.metrics["handoff_keys_sent"] += len(items)
            if "keys_sent" in self.progress:
                self.progress["keys_sent"] += len(items)
            acked.add(seq)
            while next_unacked in acked:
                acked.discard(next_unacked)
                next_unacked += 1
            while finished and finished[0][0] < next_unacked:
                on_done(target, finished.popleft()[1])

        async with trio.open_nursery() as nursery:
            chunk: list[list[Any]] = []
            size = 0

            async def flush() -> None:
                nonlocal chunk, size, sent
                await window.acquire()
                sent += 1
                nursery.start_soon(send, sent, chunk)
                chunk, size = [], 0

            beyond = self.timebound.beyond_or_false
            for partition in partitions:
                if failed:
                    break
                now_ms, withheld = wall_ms(), 0
                for key, state in list(self.store.iterate(partition)):
                    if beyond(state, now_ms):
                        withheld += 1
                        continue
                    item = len(key) + len(state) + 8
                    if chunk and (len(chunk) >= CHUNK_KEYS
                                  or size + item > self.config.max_batch_bytes):
                        await flush()
                        if failed:
                            break
                    chunk.append([key, state, None])
                    size += item
                if withheld:
                    self.metrics["handoff_skew_withheld"] += withheld
                    log.info("handoff: %d state(s) of partition %d not sent to %s: beyond the "
                             "clock skew bound (they read as absent; an operator may override "
                             "them)", withheld, partition, target)
                finished.append((sent + 1 if chunk else sent, partition))
            if chunk and not failed:
                await flush()
        if not failed:
            for _, partition in finished:  # partitions that had no state left to send
                on_done(target, partition)
