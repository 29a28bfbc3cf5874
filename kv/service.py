# The replicated key-value store's facade: any node coordinates, each key lives on the N
# nodes of its preference list, replicas converge by CRDT merges, and no acknowledged write
# is lost. `node.kv` is a KV; this module wires the rooms below and is the public API.
# Lives here: KV.start (opening the store and hints, serving the protocols, running the
# tasks), the public calls (put/get/..., status), and nothing of the work itself:
#   kv/config.py     Consistency, KVConfig, errors          kv/placement.py  ring, replicas
#   kv/authority.py  who may ask what                       kv/quorum.py     ack counting
#   kv/writes.py     the write path and its handlers        kv/reads.py      the read path
#   kv/repair.py     hint delivery, anti-entropy            kv/handoff.py    partition handoff
#   kv/sweeper.py    tombstone collection                   kv/writer.py     group commit
# A newcomer's walk of one write: docs/write-path.md.
# Must not live here: CRDT semantics (crdt/), placement and storage (shard/), transport (p2p/),
# and any logic of the rooms above (this module only passes calls on).
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import trio

import crdt
from p2p import Network
from shard import Keyspace, Ring, Store

from .authority import Authority
from .config import Consistency, KVConfig, NotAdmitted, OutcomeUnknown, QuorumError
from .forwarding import OPS_PROTOCOL
from .handoff import CHUNK_KEYS, FOREIGN_PROTOCOL, ROOTS_PROTOCOL, Handoff
from .hints import HintStore
from .ops import Op, OpError, render
from .placement import Placement
from .reads import READ_PROTOCOL, Reads
from .repair import AE_PROTOCOL, REPAIR_WINDOW_S, Repair
from .replication import APPLY_PROTOCOL, check_frame_room
from .sweeper import TombstoneSweeper
from .timebound import TimeBound
from .writer import GroupCommitWriter
from .writes import Writes

__all__ = ["KV", "Consistency", "KVConfig", "LocalState", "NotAdmitted", "OpError",
           "OutcomeUnknown", "QuorumError"]

log = logging.getLogger(__name__)

METRICS = ("writes", "reads", "read_repairs", "hints_delivered", "handoff_keys_sent",
           "partitions_dropped", "refused_batches", "merge_failures", "type_conflicts",
           "tombstones_collected", "hints_expired", "hints_dropped", "refused_ops",
           "skew_refused", "skew_overrides", "handoff_skew_withheld", "not_member_refused",
           "authority_refused", "observed_removals", "hedged_ops", "unknown_outcomes",
           "slow_marks", "expired_ops", "busy_ops")


class LocalState(NamedTuple):
    """What this node's own store holds for a key (no replica asked), and its replicas in
    preference order (the first is the primary)."""

    state: bytes | None
    replicas: list[str]


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class KV:
    """`node.kv`: the embedding API of the replicated store. Build with `KV.start(...)`.

    Every call takes a `consistency` (Consistency.ONE, QUORUM or ALL; None: the configured
    default): how many replicas must acknowledge a write, or answer a read. A write or read
    that gets fewer raises QuorumError (a write may then still be stored on some replicas),
    one whose replica did not answer at all OutcomeUnknown (a QuorumError: it may or may not
    have been applied; see docs/write-path.md);
    an op the store refuses raises OpError (its `code`: wrong_type, bad_value, too_large,
    clock_skew, bad_request); a node the network does not admit raises NotAdmitted."""

    def __init__(self, net: Network, store: Store, hints: HintStore, config: KVConfig) -> None:
        self.net = net
        self.store = store
        self.hints = hints
        self.config = config
        self.me = net.peer_id
        self.writer = GroupCommitWriter(store)
        skew_ms = int(config.max_clock_skew_s * 1000)
        # one bound for both: whatever a peer may send, a local write can overwrite
        self.clock = crdt.HLC(max_drift_ms=skew_ms)
        self.timebound = TimeBound(skew_ms)
        self.metrics: dict[str, int] = dict.fromkeys(METRICS, 0)
        self.placement = Placement(net, config)
        self.authority = Authority(net, self.placement, self.metrics)
        self.writes = Writes(net, self.writer, hints, self.placement, self.authority, config,
                             self.metrics, self.clock, self.timebound)
        self.reads = Reads(net, store, self.placement, self.writes, self.authority, config,
                           self.metrics, self.timebound)
        self.writes.observe = self.reads.get_states
        self.repair = Repair(net, store, hints, self.placement, self.writes, config,
                             self.metrics, self.timebound)
        self.handoff = Handoff(net, store, self.writer, self.placement, config, self.metrics,
                               self.timebound, self.writes.next_batch_seq)
        self.sweeper = TombstoneSweeper(net, store, self.writer, self.placement, self.reads,
                                        self.handoff, config, self.metrics)

    @classmethod
    @asynccontextmanager
    async def start(cls, net: Network, data_dir: Path,
                    config: KVConfig | None = None) -> AsyncIterator[KV]:
        """Open the store in `data_dir` (store/ and hints/), serve the store's protocols and
        run its tasks on `net` while the context lasts. A store that lost data (or may have:
        an unclean stop, a store dir moved aside) is repaired from the replicas at once."""
        config = config or KVConfig()
        used_before = (data_dir / "hints").exists()
        check_frame_room(config.max_batch_bytes, max(config.max_batch, CHUNK_KEYS),
                         net.config.network_id, net.config.max_frame_size)
        store = Store(data_dir / "store", merge=crdt.merge_encoded,
                      keyspace=Keyspace(config.partitions))
        try:
            hints = HintStore(data_dir / "hints")
        except BaseException:
            store.close()
            raise
        kv = cls(net, store, hints, config)
        repair = store.opened.needs_repair or (store.opened.state == "new" and used_before)
        if repair:
            log.warning("%s; this node repairs its replicas from the others now",
                        store.opened.describe(store.path) if store.opened.needs_repair else
                        f"store {store.path} is new in a kv dir used before (moved aside?)")
        try:
            async with trio.open_nursery() as nursery:
                kv.writes.bind(nursery)
                # every protocol of the store serves ring members only (kv/authority.py)
                for protocol, handler in (
                        (APPLY_PROTOCOL, kv.writes.on_apply), (OPS_PROTOCOL, kv.writes.on_ops),
                        (READ_PROTOCOL, kv.reads.on_read),
                        (AE_PROTOCOL, kv.repair.on_anti_entropy),
                        (ROOTS_PROTOCOL, kv.handoff.on_roots),
                        (FOREIGN_PROTOCOL, kv.handoff.on_foreign)):
                    net.handle(protocol, kv.authority.members_only(protocol, handler))
                nursery.start_soon(kv.writer.run)
                nursery.start_soon(kv.placement.run, kv._ring_changed)
                nursery.start_soon(kv.repair.hint_loop)
                nursery.start_soon(kv.repair.anti_entropy_loop)
                nursery.start_soon(kv.handoff.run)
                nursery.start_soon(kv.writes.ack_sweeper)
                nursery.start_soon(kv.sweeper.run)
                if repair:
                    nursery.start_soon(kv.repair_at_once)
                try:
                    yield kv
                finally:
                    kv.authority.closing = True
                    nursery.cancel_scope.cancel()
        finally:
            hints.close()
            store.close()

    def _ring_changed(self, old: Ring, new: Ring) -> None:
        """Plan the handoffs a ring change brings, and retire the replication links and
        forwarders to peers no longer in the ring."""
        self.handoff.plan(old, new)
        self.writes.retire_peers(set(new.members))

    # -- writes ----------------------------------------------------------------------------
    async def put(self, key: str | bytes, value: Any, consistency: Consistency | None = None,
                  *, override_skew: bool = False) -> None:
        """Write a register (last writer wins). `override_skew`: an operator's write over a
        state whose wall time is beyond the clock skew bound (stored before the bound
        existed): each replica replaces such a state instead of merging (a state within the
        bound merges as usual)."""
        await self.execute_many([Op("put", _key_bytes(key), (value,), override_skew)],
                                consistency)

    async def delete(self, key: str | bytes, consistency: Consistency | None = None, *,
                     override_skew: bool = False) -> None:
        """Delete a key (a register tombstone); `override_skew` as in put()."""
        await self.execute_many([Op("delete", _key_bytes(key), (), override_skew)], consistency)

    async def incr(self, key: str | bytes, amount: int = 1,
                   consistency: Consistency | None = None) -> None:
        """Add `amount` (may be negative) to a counter."""
        await self.execute_many([Op("incr", _key_bytes(key), (amount,))], consistency)

    async def sadd(self, key: str | bytes, *members: Any,
                   consistency: Consistency | None = None) -> None:
        """Add members to a set (add wins over a concurrent remove)."""
        await self.execute_many([Op("sadd", _key_bytes(key), members)], consistency)

    async def srem(self, key: str | bytes, *members: Any,
                   consistency: Consistency | None = None) -> None:
        """Remove members from a set (those this node has seen added)."""
        await self.execute_many([Op("srem", _key_bytes(key), members)], consistency)

    async def hset(self, key: str | bytes, field: str, value: Any,
                   consistency: Consistency | None = None) -> None:
        """Set one field of a map."""
        await self.execute_many([Op("hset", _key_bytes(key), (field, value))], consistency)

    async def hdel(self, key: str | bytes, field: str,
                   consistency: Consistency | None = None) -> None:
        """Remove one field of a map."""
        await self.execute_many([Op("hdel", _key_bytes(key), (field,))], consistency)

    async def put_many(self, items: dict[str, Any] | list[tuple[str | bytes, Any]],
                       consistency: Consistency | None = None) -> None:
        """Many puts in few messages: grouped by replica, one group commit and one signed
        replication batch per group. Raises QuorumError if any of them fell short."""
        pairs = items.items() if isinstance(items, dict) else items
        await self.execute_many([Op("put", _key_bytes(k), (v,)) for k, v in pairs], consistency)

    async def execute_many(self, ops: list[Op], consistency: Consistency | None = None) -> None:
        """Run operations: each goes to the first reachable replica of its key, which applies
        it (as the CRDT actor) and replicates it; returns when every op has W acks."""
        await self.writes.execute_many(
            ops, Consistency(consistency or self.config.write_consistency))

    # -- reads -----------------------------------------------------------------------------
    async def get(self, key: str | bytes, consistency: Consistency | None = None) -> Any:
        """The merged value of R replicas (None for a missing or deleted key)."""
        state = await self.get_state(key, consistency)
        return render(crdt.decode(state) if state is not None else None)

    async def get_state(self, key: str | bytes,
                        consistency: Consistency | None = None) -> bytes | None:
        """The merged encoded CRDT state of R replicas of `key` (None if no replica has it)."""
        return (await self.get_states([_key_bytes(key)], consistency))[0]

    async def get_many(self, keys: list[str | bytes],
                       consistency: Consistency | None = None) -> list[Any]:
        """Values of many keys in one request per replica."""
        states = await self.get_states([_key_bytes(k) for k in keys], consistency)
        return [render(crdt.decode(s) if s is not None else None) for s in states]

    async def get_states(self, keys: list[bytes], consistency: Consistency | None = None
                         ) -> list[bytes | None]:
        """Ask every live replica of the keys (one request per replica), merge the answers of
        each key once R replicas gave one, and repair replicas that answered stale."""
        return await self.reads.get_states(
            keys, Consistency(consistency or self.config.read_consistency))

    def local_state(self, key: str | bytes) -> LocalState:
        """What this node's own store holds for `key`, without asking any replica, and the
        key's replicas (debugging: GET /kv-local/KEY)."""
        raw = _key_bytes(key)
        return LocalState(self.store.get(raw), self.placement.ring.preference_list(raw))

    # -- the ring and background repair ----------------------------------------------------
    @property
    def ring(self) -> Ring:
        """The ring as this node sees it now (rebuilt when membership changes)."""
        return self.placement.ring

    def copies(self) -> int:
        """How many replicas each key has now: N, or every ring member while fewer."""
        return self.placement.copies()

    def next_batch_seq(self) -> int:
        """The sequence of the next kv-apply batch this node sends."""
        return self.writes.next_batch_seq()

    @property
    def last_anti_entropy(self) -> dict[int, float]:
        """Per partition, when (time.monotonic) anti-entropy last compared it."""
        return self.repair.last_anti_entropy

    async def repair_at_once(self, window: float = REPAIR_WINDOW_S) -> None:
        """Compare every owned partition with every live replica now (after data loss)."""
        await self.repair.repair_at_once(window)

    # -- status ----------------------------------------------------------------------------
    @property
    def handoff_progress(self) -> dict[str, Any]:
        """What is left of handing off partitions this node no longer owns ({}: nothing)."""
        return self.handoff.progress

    def status(self) -> dict[str, Any]:
        """This node's view of the store, for GET /kv-status and metrics."""
        ring = self.placement.ring
        owned = self.placement.owned_partitions()
        now = time.monotonic()
        ages = [now - t for t in self.repair.last_anti_entropy.values()]
        copies = self.copies()
        replication = self.writes.status()
        return {
            "ring_members": len(ring.members),
            "copies": copies,
            "warning": (f"keys have {copies} of {self.config.replicas} copies until "
                        f"{self.config.replicas - copies} more node(s) join"
                        if copies < self.config.replicas else None),
            "partitions": ring.partitions,
            "partitions_owned": len(owned),
            "keys": len(self.store),
            "replication_backlog": replication["replication_backlog"],
            "hints_pending": self.hints.pending(),
            "anti_entropy": {
                "partitions_synced": len(self.repair.last_anti_entropy),
                "partitions_deferred": self.repair.quiet.deferred,
                "oldest_s_ago": round(max(ages), 1) if ages else None,
                "newest_s_ago": round(min(ages), 1) if ages else None,
            },
            "handoff": self.handoff_progress,
            "metrics": {**self.metrics, "write_batches": self.writer.batches,
                        "local_writes": self.writer.writes,
                        "replication_batches": replication["replication_batches"],
                        "replication_deltas": replication["replication_deltas"],
                        "replayed_batches": self.writes.replay_guard.refused,
                        "oversized_dropped": replication["oversized_dropped"]},
        }

    def partition_status(self) -> list[dict[str, Any]]:
        """Per partition this node replicates: its keys here, its replicas in order (the
        first is the primary) and how long ago anti-entropy last compared it (None: never,
        since this node started)."""
        now = time.monotonic()
        ring = self.placement.ring
        rows = []
        for partition in sorted(self.placement.owned_partitions()):
            synced = self.repair.last_anti_entropy.get(partition)
            rows.append({
                "partition": partition,
                "keys": self.store.count(partition),
                "replicas": ring.owners(partition),
                "anti_entropy_s_ago": round(now - synced, 1) if synced is not None else None,
            })
        return rows
