# The replicated key-value store: any node coordinates, each key lives on the N nodes of its
# preference list, replicas converge by CRDT merges, and no acknowledged write is lost.
# Lives here: the ring kept in step with membership, the write path (mutating replica, W
# acks, hinted handoff), the read path (R replicas, merge, read repair), hint delivery,
# anti-entropy between replicas, and the wiring of partition handoff (kv/handoff.py) and of
# tombstone collection (kv/sweeper.py, its rule in kv/tombstones.py); hint expiry.
# Must not live here: CRDT semantics (crdt/), placement and storage (shard/), transport (p2p/).
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import trio

import crdt
from p2p import ConfigError, Network, RemoteError, RequestError
from p2p.envelope import EnvelopeError, TimedReplayGuard, next_timed_seq
from p2p.rpc import HandlerError
from shard import Initiator, Keyspace, ProtocolError, QuietPartitions, Responder, Ring, Store

from .forwarding import MAX_OPS_PER_REQUEST, OPS_PROTOCOL, UNREACHABLE, Forwarder
from .handoff import CHUNK_KEYS, FOREIGN_PROTOCOL, ROOTS_PROTOCOL, Handoff
from .hints import HintStore
from .ops import (
    DELTA_OVERHEAD_BYTES,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    Op,
    OpError,
    check_growth,
    check_op,
    make_delta,
    render,
    shown_key,
)
from .replication import (
    APPLY_PROTOCOL,
    Delta,
    PeerLink,
    check_frame_room,
    fits_frame,
    open_batch,
    seal_batch,
)
from .sweeper import TombstoneSweeper
from .timebound import TimeBound, apply_reply, refused_indices, wall_ms
from .writer import GroupCommitWriter, Replace, Replacement

log = logging.getLogger(__name__)

READ_PROTOCOL = "kv-read"
AE_PROTOCOL = "kv-ae"
MAX_AE_SESSIONS_PER_PEER = 4
ACK_SWEEP_S = 0.05  # how often write waits are checked against their deadline
REPAIR_WINDOW_S = 300.0  # how long a repair after data loss waits for replicas to compare with
REPAIR_POLL_S = 0.5  # how often it looks for live replicas it has not compared with yet


class Consistency(StrEnum):
    ONE = "one"
    QUORUM = "quorum"
    ALL = "all"

    def needed(self, replicas: int) -> int:
        return {"one": 1, "quorum": replicas // 2 + 1, "all": replicas}[self.value]


class QuorumError(Exception):
    """Fewer replicas than the consistency level asks for answered in time."""


class NotAdmitted(Exception):
    """The network's admission rule does not admit this node (yet): it neither coordinates
    reads and writes nor holds data, so that nothing it stored while outside the network
    flows in by handoff once it is admitted."""


@dataclass
class KVConfig:
    replicas: int = 3
    # 4096 partitions keep primary load within ~5% of the mean up to a few tens of nodes
    # while per-partition work (handoff scans, anti-entropy snapshots) stays cheap
    partitions: int = 4096
    write_consistency: Consistency = Consistency.QUORUM
    read_consistency: Consistency = Consistency.QUORUM
    request_timeout: float = 5.0
    hint_interval: float = 1.0
    anti_entropy_interval: float = 10.0
    # a round compares only partitions whose root held still this long before it (at most
    # half the interval), and puts off one that kept changing at most this many rounds in a
    # row with each peer (shard/quiet.py): writes in flight are push replication's to deliver
    anti_entropy_settle_s: float = 1.0
    anti_entropy_max_deferrals: int = 5
    rebalance_interval: float = 2.0
    max_batch: int = 512
    # replication, hint and handoff batches stay below this many bytes (frames are 4 MiB:
    # KV.start checks that a full batch fits one), and so does every key with the delta a
    # write makes of it or the state it leaves (larger: the write is refused as too_large)
    max_batch_bytes: int = 2 * 1024 * 1024
    # one operation's key, and its arguments (a value, members, a field) encoded, may not be
    # larger than these (too_large), wherever the op comes from
    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = MAX_VALUE_BYTES
    queue_per_peer: int = 20_000
    # a register tombstone is collected once its delete is this old and every replica holds
    # it or nothing; hints older than hint_ttl_s are dropped (anti-entropy repairs instead)
    tombstone_grace_s: float = 3600.0
    hint_ttl_s: float = 1800.0
    tombstone_sweep_interval: float = 10.0
    tombstone_scan_keys: int = 5000  # keys read per sweep round
    # the ring unchanged and every member alive this long before a sweep round may collect
    tombstone_settle_s: float = 60.0
    # no state from a peer may carry a wall time further ahead of this node's clock than
    # this (refused, counted in skew_refused, its sender scored down); local writes bound
    # the timestamps they observe by it too (kv/timebound.py)
    max_clock_skew_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.max_clock_skew_s > 0:
            raise ValueError(f"max_clock_skew_s must be > 0, got {self.max_clock_skew_s}")
        if self.anti_entropy_settle_s < 0 or self.anti_entropy_max_deferrals < 0:
            raise ValueError("anti_entropy_settle_s and anti_entropy_max_deferrals must be >= 0")
        # a hint older than a collected tombstone's grace would bring the deleted key back
        if not 0 < self.hint_ttl_s <= self.tombstone_grace_s:
            raise ValueError(f"hint_ttl_s ({self.hint_ttl_s}) must be > 0 and <= "
                             f"tombstone_grace_s ({self.tombstone_grace_s})")
        # the largest write must make a delta that fits in a batch (and so in a frame)
        largest = self.max_key_bytes + self.max_value_bytes + DELTA_OVERHEAD_BYTES
        if largest > self.max_batch_bytes:
            raise ConfigError(f"max_key_bytes ({self.max_key_bytes}) + max_value_bytes "
                              f"({self.max_value_bytes}) + {DELTA_OVERHEAD_BYTES} bytes of "
                              f"CRDT overhead exceed max_batch_bytes ({self.max_batch_bytes}): "
                              "the largest write could not be replicated")


class _AckGroup:
    """The ops of one `_mutate_and_replicate` call: `done` is set once every op settled, or
    when the sweeper expires the group (a replica that never answers)."""

    __slots__ = ("remaining", "done")

    def __init__(self) -> None:
        self.remaining = 0
        self.done = trio.Event()

    def one_settled(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.done.set()


class _Acks:
    """Counts replica outcomes of one write until enough succeeded or all are known.
    `primaries_only` (consistency ALL): a fallback node holding a hint for a replica that is
    down does not count for it."""

    __slots__ = ("needed", "total", "ok", "known", "settled", "group", "primaries_only")

    def __init__(self, needed: int, total: int, group: _AckGroup,
                 primaries_only: bool = False) -> None:
        self.needed, self.total = needed, total
        self.primaries_only = primaries_only
        self.ok = self.known = 0
        self.group = group
        self.settled = needed <= 0 or total == 0
        if not self.settled:
            group.remaining += 1

    def __call__(self, ok: bool) -> None:
        self.known += 1
        self.ok += ok
        if not self.settled and (self.ok >= self.needed or self.known >= self.total):
            self.settled = True
            self.group.one_settled()


class _Routes:
    """Per partition, for one ring and one set of live members: the replica that applies its
    ops (its first live replica, this node first: None if none is live), and the other
    replicas this node replicates to, each with its link (None: down, so it gets a hint)."""

    __slots__ = ("mutators", "targets")

    def __init__(self) -> None:
        self.mutators: dict[int, str | None] = {}
        self.targets: dict[int, list[tuple[str, PeerLink | None]]] = {}


_shown = shown_key


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class KV:
    """`node.kv`: the embedding API of the replicated store. Build with `KV.start(...)`."""

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
        self.ring = self._build_ring()
        self._links: dict[str, PeerLink] = {}
        self._forwarders: dict[str, Forwarder] = {}
        self._nursery: trio.Nursery | None = None
        self._ae_sessions: dict[tuple[str, int], tuple[Responder, float]] = {}
        self._ae_next_sid = 0
        self._quiet = QuietPartitions(config.anti_entropy_max_deferrals)
        self._ack_deadlines: deque[tuple[float, _AckGroup]] = deque()  # in deadline order
        self._shared_cache: tuple[Ring | None, dict[str, frozenset[int]]] = (None, {})
        # per partition, the replica that applies its ops, and where this node sends what it
        # applies (see _routes); valid for one ring and one set of live members
        self._route_cache: tuple[Ring | None, frozenset[str], _Routes] = (
            None, frozenset(), _Routes())
        self.last_anti_entropy: dict[int, float] = {}
        self.handoff = Handoff(self)
        self.metrics = {"writes": 0, "reads": 0, "read_repairs": 0, "hints_delivered": 0,
                        "handoff_keys_sent": 0, "partitions_dropped": 0, "refused_batches": 0,
                        "merge_failures": 0, "type_conflicts": 0, "tombstones_collected": 0,
                        "hints_expired": 0, "hints_dropped": 0, "refused_ops": 0,
                        "skew_refused": 0, "skew_overrides": 0, "handoff_skew_withheld": 0,
                        "not_member_refused": 0, "authority_refused": 0}
        # kv-apply batches: this node's sequences, and the guard against replayed ones
        self._batch_seq = 0
        self.replay_guard = TimedReplayGuard()
        self.sweeper = TombstoneSweeper(self)

    @classmethod
    @asynccontextmanager
    async def start(cls, net: Network, data_dir: Path,
                    config: KVConfig | None = None) -> AsyncIterator[KV]:
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
                kv._nursery = nursery
                # every protocol of the store serves ring members only (see _members_only)
                for protocol, handler in (
                        (APPLY_PROTOCOL, kv._on_apply), (OPS_PROTOCOL, kv._on_ops),
                        (READ_PROTOCOL, kv._on_read), (AE_PROTOCOL, kv._on_anti_entropy),
                        (ROOTS_PROTOCOL, kv.handoff.on_roots),
                        (FOREIGN_PROTOCOL, kv.handoff.on_foreign)):
                    net.handle(protocol, kv._members_only(protocol, handler))
                nursery.start_soon(kv.writer.run)
                nursery.start_soon(kv._ring_loop)
                nursery.start_soon(kv._hint_loop)
                nursery.start_soon(kv._anti_entropy_loop)
                nursery.start_soon(kv.handoff.run)
                nursery.start_soon(kv._ack_sweeper)
                nursery.start_soon(kv.sweeper.run)
                if repair:
                    nursery.start_soon(kv.repair_at_once)
                try:
                    yield kv
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            hints.close()
            store.close()

    # -- public API ----------------------------------------------------------------------
    async def put(self, key: str | bytes, value: Any, consistency: str | None = None, *,
                  override_skew: bool = False) -> None:
        """Write a register. `override_skew`: an operator's write over a state whose wall
        time is beyond the clock skew bound (stored before the bound existed): each replica
        replaces such a state instead of merging (a state within the bound merges as usual)."""
        await self._execute(Op("put", _key_bytes(key), (value,), override_skew), consistency)

    async def delete(self, key: str | bytes, consistency: str | None = None, *,
                     override_skew: bool = False) -> None:
        """Delete a key; `override_skew` as in put()."""
        await self._execute(Op("delete", _key_bytes(key), (), override_skew), consistency)

    async def incr(self, key: str | bytes, amount: int = 1,
                   consistency: str | None = None) -> None:
        await self._execute(Op("incr", _key_bytes(key), (amount,)), consistency)

    async def sadd(self, key: str | bytes, *members: Any, consistency: str | None = None) -> None:
        await self._execute(Op("sadd", _key_bytes(key), members), consistency)

    async def srem(self, key: str | bytes, *members: Any, consistency: str | None = None) -> None:
        await self._execute(Op("srem", _key_bytes(key), members), consistency)

    async def hset(self, key: str | bytes, field: str, value: Any,
                   consistency: str | None = None) -> None:
        await self._execute(Op("hset", _key_bytes(key), (field, value)), consistency)

    async def hdel(self, key: str | bytes, field: str, consistency: str | None = None) -> None:
        await self._execute(Op("hdel", _key_bytes(key), (field,)), consistency)

    async def put_many(self, items: dict[str, Any] | list[tuple[str | bytes, Any]],
                       consistency: str | None = None) -> None:
        """Many puts in few messages: grouped by replica, one group commit and one signed
        replication batch per group. Raises QuorumError if any of them fell short."""
        pairs = items.items() if isinstance(items, dict) else items
        await self.execute_many([Op("put", _key_bytes(k), (v,)) for k, v in pairs], consistency)

    async def get(self, key: str | bytes, consistency: str | None = None) -> Any:
        """The merged value of R replicas (None for a missing or deleted key)."""
        state = await self.get_state(key, consistency)
        return render(crdt.decode(state) if state is not None else None)

    async def get_state(self, key: str | bytes, consistency: str | None = None) -> bytes | None:
        """The merged encoded CRDT state of R replicas of `key` (None if no replica has it)."""
        return (await self.get_states([_key_bytes(key)], consistency))[0]

    async def get_many(self, keys: list[str | bytes], consistency: str | None = None) -> list[Any]:
        """Values of many keys in one request per replica."""
        states = await self.get_states([_key_bytes(k) for k in keys], consistency)
        return [render(crdt.decode(s) if s is not None else None) for s in states]

    async def get_states(self, keys: list[bytes], consistency: str | None = None
                         ) -> list[bytes | None]:
        """Ask every live replica of the keys (one request per replica), merge the answers of
        each key once R replicas gave one, and repair replicas that answered stale."""
        self._check_admitted()
        level = Consistency(consistency or self.config.read_consistency)
        needed = level.needed(self.copies())
        wanted: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            for peer in self._alive_replicas(key):
                wanted.setdefault(peer, []).append(index)
        answers: list[dict[str, bytes | None]] = [{} for _ in keys]
        failures: dict[str, str] = {}  # peer -> why it did not answer
        complete = trio.Event()
        missing = len(keys)
        outstanding = sum((len(ix) + 1023) // 1024 for ix in wanted.values())

        async def ask(peer: str, indices: list[int]) -> None:
            nonlocal missing, outstanding
            try:
                await ask_once(peer, indices)
            finally:
                outstanding -= 1
                if outstanding == 0:  # every replica answered or failed: stop waiting
                    complete.set()

        async def ask_once(peer: str, indices: list[int]) -> None:
            nonlocal missing
            while indices:
                states = await self.read_states(peer, [keys[i] for i in indices], failures)
                if states is None:
                    return
                later: list[int] = []
                for i, state in zip(indices, states, strict=True):
                    if state is False:  # did not fit in this reply: ask again
                        later.append(i)
                        continue
                    answers[i][peer] = state if isinstance(state, bytes) else None
                    if len(answers[i]) == needed:
                        missing -= 1
                if missing == 0:
                    complete.set()
                if len(later) == len(indices):
                    return  # no progress: a single state larger than a reply
                indices = later

        if outstanding == 0:
            complete.set()
        async with trio.open_nursery() as nursery:
            for peer, indices in wanted.items():
                for start in range(0, len(indices), 1024):
                    nursery.start_soon(ask, peer, indices[start:start + 1024])
            # each request is bounded by its own timeout; stop once every key has R answers
            await complete.wait()
            nursery.cancel_scope.cancel()
        short = [keys[i] for i, a in enumerate(answers) if len(a) < needed]
        if short:
            log.warning("read: %d of %d keys short of %d answers; asked %s; failed: %s",
                        len(short), len(keys), needed,
                        {p[-6:]: len(ix) for p, ix in wanted.items()},
                        {p[-6:]: why for p, why in failures.items()} or "none")
            raise QuorumError(f"read of {short[0]!r} (and {len(short) - 1} more): fewer than "
                              f"{needed} replicas answered")
        self.metrics["reads"] += len(keys)
        return [self._merge_and_repair(key, answer) for key, answer in zip(keys, answers,
                                                                           strict=True)]

    async def read_states(self, peer: str, keys: list[bytes],
                          failures: dict[str, str] | None = None
                          ) -> list[bytes | None | bool] | None:
        """What `peer` (this node included) stores for each of `keys` (at most 1024): a
        state, None (nothing), or False (did not fit in the reply: ask again); None when the
        peer did not answer or answered nonsense, and then why in `failures[peer]`."""
        if peer == self.me:
            return [self.store.get(k) for k in keys]
        try:
            states = await self.net.request(peer, READ_PROTOCOL, {"keys": keys},
                                            timeout=self.config.request_timeout)
        except RequestError as exc:
            log.info("read of %d keys from %s failed: %s", len(keys), peer, exc)
            if failures is not None:
                failures[peer] = str(exc)[:200]
            return None
        if not isinstance(states, list) or len(states) != len(keys):
            if failures is not None:
                failures[peer] = "malformed answer"
            return None
        return states

    def _merge_and_repair(self, key: bytes, answers: dict[str, bytes | None]) -> bytes | None:
        # answers beyond the clock skew bound are left out of the merge (never written back)
        # and their replicas repaired with an override from the others; a key whose answers
        # are all beyond the bound reads as absent until an operator overrides it
        now_ms = wall_ms()
        beyond = self.timebound.beyond_or_false
        skewed = [peer for peer, state in answers.items()
                  if state is not None and beyond(state, now_ms)]
        for peer in skewed:
            del answers[peer]
        if skewed:
            self.metrics["skew_refused"] += len(skewed)
            self.timebound.report(len(skewed), f"of {_shown(key)} answering a read from",
                                  ", ".join(p[-6:] for p in skewed))
        merged: bytes | None = None
        for peer, state in list(answers.items()):
            if state is None:
                continue
            try:
                merged = crdt.merge_encoded(merged, state)
            except (crdt.DecodeError, TypeError, ValueError) as exc:
                del answers[peer]
                try:
                    crdt.decode(state)
                except crdt.DecodeError:
                    log.warning("replica %s answered a corrupt state for %r: %s", peer, key, exc)
                    self.net.penalize(peer, "malformed")
                    continue
                # both states are sound but of different types (concurrent first writes of
                # two types): keep the first, report the conflict
                self.metrics["type_conflicts"] += 1
                log.warning("type conflict on %r between replicas: %s", key, exc)
        if merged is not None:
            for peer, state in answers.items():
                if state != merged:
                    self.metrics["read_repairs"] += 1
                    self._send_nowait(peer, Delta(key, merged, None, None))
            for peer in skewed:
                self.metrics["read_repairs"] += 1
                self._send_nowait(peer, Delta(key, merged, None, None, override=True))
        elif skewed:
            log.warning("%s reads as absent: every replica that answered holds a state beyond "
                        "the clock skew bound; an operator may overwrite or delete it with "
                        "override_skew", _shown(key))
        return merged

    @property
    def handoff_progress(self) -> dict[str, Any]:
        """What is left of handing off partitions this node no longer owns ({}: nothing)."""
        return self.handoff.progress

    def status(self) -> dict[str, Any]:
        owned = self._owned_partitions()
        now = time.monotonic()
        ages = [now - t for t in self.last_anti_entropy.values()]
        copies = self.copies()
        return {
            "ring_members": len(self.ring.members),
            "copies": copies,
            "warning": (f"keys have {copies} of {self.config.replicas} copies until "
                        f"{self.config.replicas - copies} more node(s) join"
                        if copies < self.config.replicas else None),
            "partitions": self.ring.partitions,
            "partitions_owned": len(owned),
            "keys": len(self.store),
            "replication_backlog": sum(link.backlog for link in self._links.values()),
            "hints_pending": self.hints.pending(),
            "anti_entropy": {
                "partitions_synced": len(self.last_anti_entropy),
                "partitions_deferred": self._quiet.deferred,
                "oldest_s_ago": round(max(ages), 1) if ages else None,
                "newest_s_ago": round(min(ages), 1) if ages else None,
            },
            "handoff": self.handoff_progress,
            "metrics": {**self.metrics, "write_batches": self.writer.batches,
                        "local_writes": self.writer.writes,
                        "replication_batches": sum(k.batches for k in self._links.values()),
                        "replication_deltas": sum(k.sent for k in self._links.values()),
                        "replayed_batches": self.replay_guard.refused,
                        "oversized_dropped": sum(k.oversized for k in self._links.values())},
        }

    def partition_status(self) -> list[dict[str, Any]]:
        """Per partition this node replicates: its keys here, its replicas in order (the
        first is the primary) and how long ago anti-entropy last compared it (None: never,
        since this node started)."""
        now = time.monotonic()
        rows = []
        for partition in sorted(self._owned_partitions()):
            synced = self.last_anti_entropy.get(partition)
            rows.append({
                "partition": partition,
                "keys": self.store.count(partition),
                "replicas": self.ring.owners(partition),
                "anti_entropy_s_ago": round(now - synced, 1) if synced is not None else None,
            })
        return rows

    # -- membership and ring -------------------------------------------------------------
    def _check_admitted(self) -> None:
        admission = self.net.admission
        if admission.rule.closed and not admission.admits_self():
            why = ("no reading of the stakes off the chain yet" if not admission.settled
                   else f"the rule asks for {admission.rule.describe()}")
            raise NotAdmitted(f"this node is not admitted to the network ({why}): it neither "
                              f"reads nor writes the store")

    def _ring_members(self) -> set[str]:
        """Members that hold data: everyone known except those who left on purpose. A node
        that crashed stays in the ring (its writes wait in hints) until it is forgotten.
        The view holds admitted peers only; this node is a member if the rule admits it
        (or when it knows nobody else: a ring needs one member, and refusals elsewhere keep
        a node the network does not admit from holding anyone's data)."""
        others = {m.peer_id for m in self.net.view.members() if not m.left}
        if self.net.admits(self.me) or not others:
            others.add(self.me)
        return others

    def copies(self) -> int:
        """How many replicas each key has: N, or every ring member while the ring has fewer
        than N (a one-node network keeps one copy and accepts writes, as Riak's one-node
        cluster does); quorums count over these. Handoff brings keys up to N as members
        join."""
        return min(self.config.replicas, len(self.ring.members))

    def _alive(self) -> set[str]:
        return {self.me} | self.net.view.alive_ids()

    def _build_ring(self) -> Ring:
        return Ring(sorted(self._ring_members()), partitions=self.config.partitions,
                    replicas=self.config.replicas)

    def _alive_replicas(self, key: bytes, alive: set[str] | None = None) -> list[str]:
        if alive is None:
            alive = self._alive()
        replicas = [p for p in self.ring.preference_list(key) if p in alive]
        if self.me in replicas:  # local first: no round trip
            replicas.remove(self.me)
            replicas.insert(0, self.me)
        return replicas

    async def _ring_loop(self) -> None:
        while True:
            members = self._ring_members()
            if members != set(self.ring.members):
                old, self.ring = self.ring, self._build_ring()
                log.info("ring rebuilt: %d members (was %d)", len(self.ring.members),
                         len(old.members))
                self.handoff.plan(old, self.ring)
            await trio.sleep(min(0.5, self.config.rebalance_interval))

    # -- write path ----------------------------------------------------------------------
    async def _execute(self, op: Op, consistency: str | None) -> None:
        await self.execute_many([op], consistency)

    async def execute_many(self, ops: list[Op], consistency: str | None = None,
                           *, avoid: frozenset[str] = frozenset()) -> None:
        """Run operations: each goes to the first reachable replica of its key, which applies
        it (as the CRDT actor) and replicates it; returns when every op has W acks."""
        self._check_admitted()
        level = Consistency(consistency or self.config.write_consistency)
        groups: dict[str, list[Op]] = {}
        sizes: dict[str, list[int]] = {}  # per group, each op's encoded arguments in bytes
        partitions: dict[str, list[int]] = {}  # per group, each op's partition
        alive = self._alive()  # once per call, not per op
        mutators = self._routes(alive).mutators if not avoid else {}  # per partition
        partition_of = self.ring.partition_of
        for op in ops:
            size = check_op(op, self.config.max_key_bytes, self.config.max_value_bytes)
            partition = partition_of(op.key)
            if partition in mutators:
                mutator = mutators[partition]
            else:
                candidates = [p for p in self._alive_replicas(op.key, alive) if p not in avoid]
                mutator = mutators[partition] = candidates[0] if candidates else None
            if mutator is None:
                raise QuorumError(f"no replica of {_shown(op.key)} is reachable")
            groups.setdefault(mutator, []).append(op)
            sizes.setdefault(mutator, []).append(size)
            partitions.setdefault(mutator, []).append(partition)
        failures: list[Exception] = []

        async def run_group(mutator: str, group: list[Op]) -> None:
            try:
                await self._run_at(mutator, group, sizes[mutator], partitions[mutator], level,
                                   avoid)
            except (QuorumError, OpError) as exc:
                failures.append(exc)

        if len(groups) == 1:  # the common case: no task of its own
            await run_group(*next(iter(groups.items())))
        else:
            async with trio.open_nursery() as nursery:
                for mutator, group in groups.items():
                    nursery.start_soon(run_group, mutator, group)
        if len(ops) == 1 and failures:
            raise failures[0]
        if failures:
            raise QuorumError(f"{len(failures)} of {len(groups)} replica groups failed; "
                              f"first: {failures[0]}")
        self.metrics["writes"] += len(ops)

    def _routes(self, alive: set[str]) -> _Routes:
        """The per-partition routes for the current ring and live members (a fresh, empty
        cache when either changed); the write path fills it as partitions come."""
        ring, members, routes = self._route_cache
        if ring is not self.ring or members != alive:
            routes = _Routes()
            self._route_cache = (self.ring, frozenset(alive), routes)
        return routes

    async def _run_at(self, mutator: str, ops: list[Op], sizes: list[int], partitions: list[int],
                      level: Consistency, avoid: frozenset[str]) -> None:
        if mutator == self.me:
            await self._mutate_and_replicate(ops, level, partitions)
            return
        outcomes = await self._forwarder(mutator).submit(ops, sizes, level.value)
        unsent = [op for op, o in zip(ops, outcomes, strict=True)
                  if o is not None and o[0] == UNREACHABLE]
        failed = [o for o in outcomes if o is not None and o[0] != UNREACHABLE]
        if unsent:  # never sent, so never applied: the next replicas may apply them
            await self.execute_many(unsent, level.value, avoid=avoid | {mutator})
        if not failed:
            return
        code, message = failed[0]
        if len(ops) == 1 and code in ("wrong_type", "bad_request", "bad_value", "clock_skew",
                                         "too_large"):
            raise OpError(code, message)
        raise QuorumError(f"{len(failed)} of {len(ops)} ops failed at {mutator}; first: "
                          f"{code}: {message}")

    def _forwarder(self, peer: str) -> Forwarder:
        forwarder = self._forwarders.get(peer)
        if forwarder is None:
            forwarder = Forwarder(self.net, peer, self.config.max_batch_bytes,
                                  self.config.request_timeout * 2)
            self._forwarders[peer] = forwarder
            self._nursery_soon(forwarder.run)
        return forwarder

    async def _mutate_and_replicate(self, ops: list[Op], level: Consistency,
                                    partitions: list[int]) -> None:
        """Apply `ops` here and replicate them; raises if any failed (the op's own OpError
        for a single op, else QuorumError)."""
        outcomes = await self._apply_and_replicate(ops, level, partitions)
        failed = [o for o in outcomes if o is not None]
        if not failed:
            return
        if len(ops) == 1:
            raise failed[0]
        refused = [o for o in failed if isinstance(o, OpError)]
        raise QuorumError(f"{len(failed) - len(refused)} of {len(ops)} ops had fewer than "
                          f"{level.needed(self.copies())} acks; {len(refused)} refused "
                          f"({refused[0] if refused else ''})")

    async def _apply_and_replicate(self, ops: list[Op], level: Consistency,
                                   partitions: list[int] | None = None
                                   ) -> list[OpError | QuorumError | None]:
        """Apply `ops` here (this node is their CRDT actor) and replicate them; per op, None
        when it has its W acks, else why not. `partitions`: each op's partition, if known."""
        now_ms = time.time_ns() // 1_000_000

        def mutation(op: Op) -> Any:
            def apply(current: bytes | None) -> bytes | None:
                # an override over a state beyond the skew bound starts the key afresh
                replace = (op.override_skew and current is not None
                           and self.timebound.beyond(current, now_ms))
                state = crdt.decode(current) if current is not None and not replace else None
                try:
                    delta = make_delta(op, state, self.me, self.clock, now_ms)
                    if delta is None:
                        return None
                    encoded = crdt.encode(delta)
                    check_growth(op, None if replace else current, encoded,
                                 self.config.max_batch_bytes)
                    if replace:
                        self.metrics["skew_overrides"] += 1
                        log.info("%s of %s replaces a state beyond the clock skew bound",
                                 op.kind, _shown(op.key))
                        return Replacement(encoded)
                    return encoded
                except OpError:
                    raise
                except (TypeError, ValueError, OverflowError) as exc:
                    raise OpError("bad_value", f"{op.kind} of {_shown(op.key)}: {exc}") from None
            return apply

        results = await self.writer.mutate_many([(op.key, mutation(op)) for op in ops])
        needed = level.needed(self.copies()) - 1
        waits: list[_Acks | None] = []
        alive = self._alive()  # once per batch, not per (op, peer)
        # `remaining` starts at 1 for this loop itself: acks that arrive while a later push
        # waits on a full queue cannot complete the group before every op is in it
        group = _AckGroup()
        group.remaining = 1
        owners = self.ring.owners
        if partitions is None:
            partitions = [self.ring.partition_of(op.key) for op in ops]
        targets_of = self._routes(alive).targets
        for op, delta, partition in zip(ops, results, partitions, strict=True):
            if isinstance(delta, BaseException):
                waits.append(None)
                continue
            if delta is None:  # the op changes nothing: nothing to store or replicate
                waits.append(_Acks(0, 0, group))
                continue
            targets = targets_of.get(partition)
            if targets is None:
                targets = targets_of[partition] = [
                    (peer, self._link(peer) if peer in alive else None)
                    for peer in owners(partition) if peer != self.me]
            acks = _Acks(needed, len(targets), group, level is Consistency.ALL)
            # the same item goes to every replica
            item = Delta(op.key, delta, None, acks, op.override_skew)
            for peer, link in targets:
                if link is None:
                    self._hint(peer, [item])
                elif not link.push_nowait(item):  # no checkpoint: a batch of ops fills one batch
                    await link.push(item)
            waits.append(acks)
        group.one_settled()
        if group.remaining > 0:
            # expired by the sweeper after request_timeout (no cancel scope per call: on the
            # single-write path a scope costs more than the rest of this function)
            self._ack_deadlines.append((trio.current_time() + self.config.request_timeout,
                                        group))
            await group.done.wait()
        outcomes: list[OpError | QuorumError | None] = []
        for op, result, waited in zip(ops, results, waits, strict=True):
            if waited is None:
                outcomes.append(result if isinstance(result, OpError) else QuorumError(
                    f"{op.kind} of {_shown(op.key)} was not stored here: {result}"))
            elif waited.ok < waited.needed:
                outcomes.append(QuorumError(f"{op.kind} of {_shown(op.key)} had fewer than "
                                            f"{needed + 1} acks"))
            else:
                outcomes.append(None)
        return outcomes

    async def _ack_sweeper(self) -> None:
        """Ends the wait of writes whose replicas did not all answer within request_timeout
        (they then count as short of acks), and forgets finished groups."""
        deadlines = self._ack_deadlines
        while True:
            await trio.sleep(ACK_SWEEP_S)
            now = trio.current_time()
            while deadlines and (deadlines[0][0] <= now or deadlines[0][1].done.is_set()):
                deadlines.popleft()[1].done.set()

    def _hint(self, target: str, items: list[Delta]) -> None:
        """Hand deltas meant for `target` to the next live node after the preference list,
        or keep them here when there is none."""
        alive = self._alive()
        for item in items:
            fallbacks = self.ring.fallbacks(self.ring.partition_of(item.key), 2)
            holders = [p for p in fallbacks if p in alive and p not in (target, self.me)]
            outcome = item.on_outcome
            if isinstance(outcome, _Acks) and outcome.primaries_only:
                outcome(False)  # the hint still goes out; it just cannot confirm an ALL write
                outcome = None
            hinted = Delta(item.key, item.delta, target, outcome, item.override)
            if holders and self._link(holders[0]).push_nowait(hinted):
                continue
            self.hints.add(target, [(item.key, item.delta)])
            if outcome is not None:
                outcome(False)

    def _on_link_failed(self, peer: str, batch: list[Delta]) -> None:
        direct = [d for d in batch if d.hint_for is None]
        if direct:
            self._hint(peer, direct)
        for item in batch:
            if item.hint_for is not None:  # the hint holder failed: keep the hint here
                self.hints.add(item.hint_for, [(item.key, item.delta)])
                if item.on_outcome is not None:
                    item.on_outcome(False)

    def _link(self, peer: str) -> PeerLink:
        link = self._links.get(peer)
        if link is None:
            link = PeerLink(self.net, peer, self.config.max_batch, self.config.max_batch_bytes,
                            self.config.queue_per_peer,
                            self._on_link_failed, self.next_batch_seq)
            self._links[peer] = link
            assert self._nursery is not None
            self._nursery.start_soon(link.run)
        return link

    def _send_nowait(self, peer: str, item: Delta) -> None:
        if peer == self.me:
            local: bytes | Replace = (Replace(item.delta, self.timebound.stale_check())
                                      if item.override else item.delta)
            self._nursery_soon(self._merge_quietly, [(item.key, local)], "read repair")
        elif not self._link(peer).push_nowait(item):
            log.debug("replication queue to %s is full; anti-entropy will repair", peer)

    def next_batch_seq(self) -> int:
        """The sequence of the next kv-apply batch this node sends (any sender of it): unique
        and increasing across restarts, near the wall time in microseconds."""
        self._batch_seq = next_timed_seq(self._batch_seq, time.time_ns() // 1000)
        return self._batch_seq

    def _nursery_soon(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- handlers ------------------------------------------------------------------------
    def _members_only(self, protocol: str, handler: Any) -> Any:
        """Wrap a handler of the store's protocols: only ring members are served. A peer
        the admission rule admits but this node's ring does not hold yet (it joined a moment
        ago) is refused without blame; anyone else is refused and scored down."""
        async def guarded(peer: str, message: Any) -> Any:
            if peer not in self.ring.members:
                if self.net.admits(peer):
                    self.metrics["not_member_refused"] += 1
                    raise HandlerError("not_member", "not (yet) a member of this node's ring")
                self.net.refuse_unadmitted(peer, protocol)
                raise HandlerError("not_admitted", "the network's admission rule does not "
                                   "admit this peer")
            return await handler(peer, message)
        return guarded

    def _check_authority(self, peer: str, direct: Sequence[tuple[bytes, object]],
                         hinted: dict[str, list[tuple[bytes, bytes]]]) -> None:
        """Write authority over a replication batch from ring member `peer`: each key it
        sends for this node to store must be replicated by the sender or by this node (an
        owner hands off to a newcomer, a fallback delivers the hints it held, and rings that
        differ for a moment still agree on one of the two); a hint it leaves here must be
        for a ring member that replicates the key, from a replica of that key. Anything else
        is refused whole: the sender keeps the batch as hints and retries, so a ring that
        lagged here loses nothing."""
        ring = self.ring
        for key, _ in direct:
            owners = ring.preference_list(key)
            if peer not in owners and self.me not in owners:
                self._refuse_authority(peer, f"key {_shown(key)} is replicated by neither "
                                             f"the sender nor this node")
        for target, items in hinted.items():
            if target not in ring.members:
                self._refuse_authority(peer, f"a hint for {target}, not a ring member")
            for key, _ in items:
                owners = ring.preference_list(key)
                if target not in owners or peer not in owners:
                    self._refuse_authority(peer, f"a hint of key {_shown(key)} for {target} "
                                                 f"from a node that does not replicate it")

    def _refuse_authority(self, peer: str, why: str) -> None:
        self.metrics["authority_refused"] += 1
        self.metrics["refused_batches"] += 1
        log.info("refused a replication batch from %s: %s", peer, why)
        raise HandlerError("authority", why)

    async def _on_apply(self, peer: str, data: Any) -> Any:
        try:
            envelope = open_batch(self.net, data, peer, self.replay_guard,
                                  time.time_ns() // 1000)
        except EnvelopeError as exc:
            self.metrics["refused_batches"] += 1
            self.net.penalize(peer, exc.reason)
            raise HandlerError("refused", str(exc)) from None
        direct: list[tuple[bytes, bytes | Replace]] = []
        hinted: dict[str, list[tuple[bytes, bytes]]] = {}
        refused: list[int] = []  # beyond the clock skew bound: neither stored nor hinted
        now_ms = wall_ms()
        stale = None
        for index, item in enumerate(envelope.payload):
            if not (isinstance(item, list) and len(item) in (3, 4)
                    and isinstance(item[0], bytes) and isinstance(item[1], bytes)
                    and (item[2] is None or isinstance(item[2], str))
                    and (len(item) == 3 or type(item[3]) is bool)):
                self.metrics["refused_batches"] += 1
                self.net.penalize(peer, "malformed")
                raise HandlerError("refused", "batch item is not [key, delta, hint_for]")
            key, delta, hint_for = item[:3]
            try:
                if self.timebound.beyond(delta, now_ms):
                    refused.append(index)
                    continue
            except crdt.DecodeError as exc:
                self.metrics["refused_batches"] += 1
                self.net.penalize(peer, "malformed")
                raise HandlerError("refused", f"batch cannot be merged: {exc}") from None
            if hint_for is None or hint_for == self.me:
                if len(item) == 4 and item[3]:  # an override: replace a state beyond the bound
                    stale = stale or self.timebound.stale_check()
                    direct.append((key, Replace(delta, stale)))
                else:
                    direct.append((key, delta))
            else:
                hinted.setdefault(hint_for, []).append((key, delta))
        self._check_authority(peer, direct, hinted)
        if refused:
            self.metrics["skew_refused"] += len(refused)
            self.net.penalize(peer, "clock_skew")
            self.timebound.report(len(refused), "in a replication batch from", peer)
        try:
            await self.writer.merge(direct)
        except Exception as exc:
            self.metrics["refused_batches"] += 1
            self.net.penalize(peer, "malformed")
            raise HandlerError("refused", f"batch cannot be merged: {exc}") from None
        for target, items in hinted.items():
            self.hints.add(target, items)
        return apply_reply(len(envelope.payload), refused)

    async def _on_ops(self, peer: str, message: Any) -> Any:
        """Groups of ops another coordinator forwarded (each group with its consistency
        level); answers, per group and op, None (applied with its quorum) or [code, why]."""
        groups: list[tuple[list[Op], Consistency]] = []
        try:
            wire_groups = message.get("groups") if isinstance(message, dict) else None
            if not isinstance(wire_groups, list) or not 0 < len(wire_groups) <= 100:
                raise OpError("bad_request", "groups must be a list of 1 to 100 groups")
            total = 0
            for group in wire_groups:
                wire_ops = group.get("ops") if isinstance(group, dict) else None
                if not isinstance(wire_ops, list) or not wire_ops:
                    raise OpError("bad_request", "a group needs a list of operations")
                total += len(wire_ops)
                groups.append(([Op.from_wire(w) for w in wire_ops],
                               Consistency(group.get("c", "quorum"))))
            if total > MAX_OPS_PER_REQUEST:
                raise OpError("bad_request", f"more than {MAX_OPS_PER_REQUEST} operations")
        except (OpError, ValueError) as exc:
            raise HandlerError("bad_request", str(exc)) from None
        replies: list[list[Any]] = [[] for _ in groups]
        refusals = [self._screen_ops(peer, ops) for ops, _ in groups]

        async def run(index: int, ops: list[Op], level: Consistency) -> None:
            refused = refusals[index]
            outcomes = iter(await self._apply_and_replicate(
                [op for i, op in enumerate(ops) if i not in refused], level))
            replies[index] = [refused[i] if i in refused else _outcome(next(outcomes))
                              for i in range(len(ops))]

        async with trio.open_nursery() as nursery:  # one group commit for all groups
            for index, (ops, level) in enumerate(groups):
                nursery.start_soon(run, index, ops, level)
        return replies

    def _screen_ops(self, peer: str, ops: list[Op]) -> dict[int, list[Any]]:
        """The ops of a forwarded group that break the size limits, by index, with the error
        that answers each. An honest coordinator refuses those itself (check_op), so the peer
        is penalized once per group that carries any."""
        refused: dict[int, list[Any]] = {}
        for index, op in enumerate(ops):
            try:
                check_op(op, self.config.max_key_bytes, self.config.max_value_bytes)
            except OpError as exc:
                refused[index] = [exc.code, str(exc)]
        if refused:
            self.metrics["refused_ops"] += len(refused)
            first = next(iter(refused.values()))
            log.warning("refused %d forwarded ops from %s: %s", len(refused), peer, first[1])
            self.net.penalize(peer, "oversized" if first[0] == "too_large" else "malformed")
        return refused

    async def _on_read(self, peer: str, message: Any) -> Any:
        keys = message.get("keys") if isinstance(message, dict) else None
        if not isinstance(keys, list) or len(keys) > 1024 or \
                not all(isinstance(k, bytes) for k in keys):
            raise HandlerError("bad_request", "read needs a list of at most 1024 byte keys")
        # states that would make the reply larger than a batch come back as False: the
        # reader asks for them again
        replies: list[bytes | None | bool] = []
        size, limit = 0, self.config.max_batch_bytes
        for key in keys:
            state = self.store.get(key) if size <= limit else None
            if size > limit or (state is not None and replies and size + len(state) > limit):
                replies.append(False)
                size = limit + 1
                continue
            size += len(state) if state is not None else 0
            replies.append(state)
        return replies

    # -- hinted handoff delivery ---------------------------------------------------------
    async def _hint_loop(self) -> None:
        while True:
            await trio.sleep(self.config.hint_interval)
            alive = self._alive()
            for target in self.hints.targets():
                expired = self.hints.expire(target, int(self.config.hint_ttl_s * 1000))
                if expired:
                    self.metrics["hints_expired"] += expired
                    log.warning("dropped %d hints for %s older than %s s; anti-entropy will "
                                "repair it", expired, target, self.config.hint_ttl_s)
                if target in alive and target != self.me:
                    await self._deliver_hints(target)

    async def _deliver_hints(self, target: str) -> None:
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
                            self.next_batch_seq())
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
    async def _anti_entropy_loop(self) -> None:
        """Each round compares this node's shared partitions with one other replica, taking
        the peers in turn; a session costs time in the number of partitions, so one per
        round keeps the load flat. Partitions being written as the round starts wait (at
        most a few rounds: see shard/quiet.py)."""
        turn = 0
        interval = self.config.anti_entropy_interval
        settle = min(self.config.anti_entropy_settle_s, interval / 2)
        while True:
            await trio.sleep(interval - settle)
            roots_before = self.store.tree.partition_roots()
            await trio.sleep(settle)
            alive = self._alive()
            peers = [p for p in sorted(self.ring.members) if p != self.me and p in alive]
            if not peers:
                continue
            turn += 1
            peer = peers[turn % len(peers)]
            self._quiet.retain(peers, self._owned_partitions())
            due = self._quiet.due(peer, self._shared_partitions(peer), roots_before,
                                  self.store.tree.partition_roots())
            if due:
                await self.anti_entropy_with(peer, due)

    async def repair_at_once(self, window: float = REPAIR_WINDOW_S) -> None:
        """After this node's store lost data (or may have: an unclean stop), compare every
        owned partition with every live replica sharing it now, all peers at once, rather
        than one peer per anti-entropy round. Peers are taken as membership finds them; done
        once every owned partition was compared and no live replica is left to compare with,
        or after `window` seconds (the periodic rounds go on in any case)."""
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
                done = len(self._owned_partitions() & frozenset().union(*compared.values()))
                log.warning("repair: compared %d partitions with %s; %d of %d owned partitions "
                            "compared, %d states received", len(partitions), peer, done,
                            len(self._owned_partitions()), received)

        with trio.move_on_after(window) as scope:
            while True:
                alive = self._alive()
                work = {peer: left for peer in sorted(self.ring.members)
                        if peer != self.me and peer in alive
                        and (left := self._shared_partitions(peer) - compared.get(peer, set()))}
                owned = self._owned_partitions()
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

    def _ring_cache(self) -> dict[str, frozenset[int]]:
        """Partition sets derived from the current ring, computed once per ring."""
        if self._shared_cache[0] is not self.ring:
            self._shared_cache = (self.ring, {})
        return self._shared_cache[1]

    def _owned_partitions(self) -> frozenset[int]:
        cache = self._ring_cache()
        if self.me not in cache:
            cache[self.me] = frozenset(self.ring.partitions_of(self.me))
        return cache[self.me]

    def _shared_partitions(self, peer: str) -> frozenset[int]:
        cache = self._ring_cache()
        if peer not in cache:
            cache[peer] = self._owned_partitions() & self.ring.partitions_of(peer)
        return cache[peer]

    async def anti_entropy_with(self, peer: str, partitions: frozenset[int]) -> int:
        """Compare the given partitions with `peer` and repair both sides; returns the number
        of states this side received."""
        self._ae_next_sid += 1
        sid = self._ae_next_sid
        session = Initiator(self.store.tree, self._offered_segment, partitions)
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
        if repaired and await self._merge_quietly(repaired, f"anti-entropy with {peer}"):
            log.info("anti-entropy with %s repaired %d keys here", peer, len(repaired))
        self._quiet.compared(peer, partitions)
        now = time.monotonic()
        for partition in partitions:
            self.last_anti_entropy[partition] = now
        return len(session.received)

    async def _on_anti_entropy(self, peer: str, message: Any) -> Any:
        if not isinstance(message, dict) or not isinstance(message.get("sid"), int):
            raise HandlerError("bad_request", "anti-entropy message needs sid and m")
        key = (peer, message["sid"])
        entry = self._ae_sessions.get(key)
        now = time.monotonic()
        if entry is None:
            mine = [k for k in self._ae_sessions if k[0] == peer]
            if len(mine) >= MAX_AE_SESSIONS_PER_PEER:
                del self._ae_sessions[min(mine, key=lambda k: self._ae_sessions[k][1])]
            entry = (Responder(self.store.tree, self._offered_segment), now)
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
                await self._merge_quietly(repaired, f"anti-entropy from {peer}")
        return reply

    def _offered_segment(self, partition: int, segment: int) -> list[tuple[bytes, bytes]]:
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

    async def _merge_quietly(self, items: Sequence[tuple[bytes, bytes | Replace]],
                             what: str) -> bool:
        """Merge states that background repair brought; a state that cannot merge (a type
        conflict between replicas, a corrupt record) is logged and counted, never fatal."""
        try:
            await self.writer.merge(items)
            return True
        except Exception:
            pass
        failed = 0
        for item in items:  # find the ones that cannot merge; merge the others
            try:
                await self.writer.merge([item])
            except Exception as exc:
                failed += 1
                log.warning("%s: state of %r not merged: %s", what, item[0], exc)
        self.metrics["merge_failures"] += failed
        return failed < len(items)

    def _owned_only(self, states: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """States of keys this node replicates now. An exchange that began under an older
        ring must not bring back a partition this node has since handed off."""
        mine = self._owned_partitions()
        return [(k, s) for k, s in states if self.ring.partition_of(k) in mine]


def _outcome(result: OpError | QuorumError | None) -> list[Any] | None:
    """One op's answer to a kv-ops request: None (applied with its quorum) or [code, why]."""
    if result is None:
        return None
    return [result.code if isinstance(result, OpError) else "quorum", str(result)]
