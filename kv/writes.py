# The write path: from an operation to W acknowledgements, and the replica's side of it.
# Lives here: execute (group ops by the replica that applies them, run them here or forward
# them, retry unsent ones at the next replica), applying ops here as their CRDT actor (a
# removal first merges what a quorum of replicas holds, so it removes every acked write), and
# pushing the deltas to the other replicas, counting acks (kv/quorum.py) against a deadline,
# hints to fallback nodes for replicas that are down, the per-peer replication links and
# forwarders, the node's batch sequences, local merges of repaired states, and the handlers
# of incoming replication batches (kv-apply) and forwarded ops (kv-ops).
# Errors on the replica side: input a peer got wrong (a malformed, replayed, corrupt or
# oversized batch or op) scores it down; a fault of this node (its disk, its writer stopped,
# a shutdown) answers `unavailable` and blames nobody.
# Must not live here: which replicas a key has (kv/placement.py), who may send what
# (kv/authority.py), the batch wire format (kv/replication.py), what ops mean (kv/ops.py).
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

import crdt
from p2p import Network
from p2p.envelope import EnvelopeError, TimedReplayGuard, next_timed_seq
from p2p.rpc import HandlerError
from shard import Ring
from shard.store import CorruptRecord

from .authority import Authority
from .config import Consistency, KVConfig, QuorumError
from .forwarding import MAX_GROUPS_PER_REQUEST, MAX_OPS_PER_REQUEST, UNREACHABLE, Forwarder
from .hints import HintStore
from .ops import (
    REMOVALS,
    Op,
    OpError,
    StateBudget,
    check_growth_sized,
    check_op,
    make_delta,
    shown_key,
)
from .placement import Placement
from .quorum import AckGroup, Acks
from .replication import Delta, PeerLink, open_batch
from .timebound import TimeBound, apply_reply, wall_ms
from .writer import GroupCommitWriter, KeyState, Made, Replace

log = logging.getLogger(__name__)

ACK_SWEEP_S = 0.05  # how often write waits are checked against their deadline


class _Routes:
    """Per partition, for one ring and one set of live members: the replica that applies its
    ops (its first live replica, this node first: None if none is live), and the other
    replicas this node replicates to, each with its link (None: down, so it gets a hint)."""

    __slots__ = ("mutators", "targets")

    def __init__(self) -> None:
        self.mutators: dict[int, str | None] = {}
        self.targets: dict[int, list[tuple[str, PeerLink | None]]] = {}


class Writes:
    """The write path of one KV node. Its tasks (links, forwarders, repair merges) run in the
    nursery given to `bind`."""

    def __init__(self, net: Network, writer: GroupCommitWriter, hints: HintStore,
                 placement: Placement, authority: Authority, config: KVConfig,
                 metrics: dict[str, int], clock: crdt.HLC, timebound: TimeBound) -> None:
        self.net = net
        self.writer = writer
        self.hints = hints
        self.placement = placement
        self.authority = authority
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.timebound = timebound
        # the quorum read (kv/reads.py, bound by the KV facade) a removal observes first
        self.observe: Callable[[list[bytes], Consistency],
                               Awaitable[list[bytes | None]]] | None = None
        self.me = net.peer_id
        self.links: dict[str, PeerLink] = {}
        self._forwarders: dict[str, Forwarder] = {}
        self._nursery: trio.Nursery | None = None
        self._ack_deadlines: deque[tuple[float, trio.Event]] = deque()  # in deadline order
        # per partition, the replica that applies its ops, and where this node sends what it
        # applies (see _routes); valid for one ring and one set of live members
        self._route_cache: tuple[Ring | None, frozenset[str], _Routes] = (
            None, frozenset(), _Routes())
        # kv-apply batches: this node's sequences, and the guard against replayed ones
        self._batch_seq = 0
        self.replay_guard = TimedReplayGuard()

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- coordinating ----------------------------------------------------------------------
    async def execute_many(self, ops: list[Op], level: Consistency,
                           *, avoid: frozenset[str] = frozenset()) -> None:
        """Run operations: each goes to the first reachable replica of its key, which applies
        it (as the CRDT actor) and replicates it; returns when every op has W acks."""
        self.authority.check_admitted()
        placement = self.placement
        groups: dict[str, list[Op]] = {}
        sizes: dict[str, list[int]] = {}  # per group, each op's encoded arguments in bytes
        partitions: dict[str, list[int]] = {}  # per group, each op's partition
        alive = placement.alive()  # once per call, not per op
        mutators = self._routes(alive).mutators if not avoid else {}  # per partition
        partition_of = placement.ring.partition_of
        for op in ops:
            size = check_op(op, self.config.max_key_bytes, self.config.max_value_bytes)
            partition = partition_of(op.key)
            if partition in mutators:
                mutator = mutators[partition]
            else:
                candidates = [p for p in placement.alive_replicas(op.key, alive)
                              if p not in avoid]
                mutator = mutators[partition] = candidates[0] if candidates else None
            if mutator is None:
                raise QuorumError(f"no replica of {shown_key(op.key)} is reachable")
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
        if ring is not self.placement.ring or members != alive:
            routes = _Routes()
            self._route_cache = (self.placement.ring, frozenset(alive), routes)
        return routes

    async def _run_at(self, mutator: str, ops: list[Op], sizes: list[int], partitions: list[int],
                      level: Consistency, avoid: frozenset[str]) -> None:
        if mutator == self.me:
            await self._mutate_and_replicate(ops, level, partitions)
            return
        outcomes = await self._forwarder(mutator).submit(ops, sizes, level)
        unsent = [op for op, o in zip(ops, outcomes, strict=True)
                  if o is not None and o[0] == UNREACHABLE]
        failed = [o for o in outcomes if o is not None and o[0] != UNREACHABLE]
        if unsent:  # never sent, so never applied: the next replicas may apply them
            await self.execute_many(unsent, level, avoid=avoid | {mutator})
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
            self.spawn(forwarder.run)
        return forwarder

    # -- applying here as the CRDT actor ---------------------------------------------------
    async def _mutate_and_replicate(self, ops: list[Op], level: Consistency,
                                    partitions: list[int]) -> None:
        """Apply `ops` here and replicate them; raises if any failed (the op's own OpError
        for a single op, else QuorumError)."""
        outcomes = await self.apply_and_replicate(ops, level, partitions)
        failed = [o for o in outcomes if o is not None]
        if not failed:
            return
        if len(ops) == 1:
            raise failed[0]
        refused = [o for o in failed if isinstance(o, OpError)]
        raise QuorumError(f"{len(failed) - len(refused)} of {len(ops)} ops had fewer than "
                          f"{level.needed(self.placement.copies())} acks; {len(refused)} "
                          f"refused ({refused[0] if refused else ''})")

    async def apply_and_replicate(self, ops: list[Op], level: Consistency,
                                  partitions: list[int] | None = None,
                                  budget: StateBudget | None = None
                                  ) -> list[OpError | QuorumError | None]:
        """Apply `ops` here (this node is their CRDT actor) and replicate them; per op, None
        when it has its W acks, else why not. `partitions`: each op's partition, if known.
        `budget`: the stored state the ops may apply to (a forwarded request's); an op beyond
        it is not applied (OpError "busy")."""
        unobserved = await self._observe_removals(ops, level)
        now_ms = wall_ms()

        def mutation(op: Op) -> Any:
            # `current` is the key's state as the batch left it: ops of one key in one batch
            # work on one decoded state (kv/writer.py KeyState), not each on the whole bytes
            def apply(current: KeyState) -> Made | None:
                if unobserved is not None and op.key in unobserved:
                    raise unobserved[op.key]
                if budget is not None:
                    budget.spend(op, current.size)
                # an override over a state beyond the skew bound starts the key afresh
                replace = (op.override_skew and current.exists
                           and self.timebound.beyond(current.finish(), now_ms))
                state = current.state if not replace else None
                try:
                    delta = make_delta(op, state, self.me, self.clock, now_ms)
                    if delta is None:
                        return None
                    encoded = crdt.encode(delta)
                    check_growth_sized(op, current.size if state is not None else None,
                                       encoded, self.config.max_batch_bytes,
                                       current.grown, delta)
                    if replace:
                        self.metrics["skew_overrides"] += 1
                        log.info("%s of %s replaces a state beyond the clock skew bound",
                                 op.kind, shown_key(op.key))
                    return encoded, delta, bool(replace)
                except OpError:
                    raise
                except (TypeError, ValueError, OverflowError) as exc:
                    raise OpError("bad_value",
                                  f"{op.kind} of {shown_key(op.key)}: {exc}") from None
            return apply

        results = await self.writer.mutate_many([(op.key, mutation(op)) for op in ops])
        needed = level.needed(self.placement.copies()) - 1
        waits: list[Acks | None] = []
        alive = self.placement.alive()  # once per batch, not per (op, peer)
        done = trio.Event()
        group = AckGroup(done.set)
        ring = self.placement.ring
        owners = ring.owners
        if partitions is None:
            partitions = [ring.partition_of(op.key) for op in ops]
        targets_of = self._routes(alive).targets
        for op, delta, partition in zip(ops, results, partitions, strict=True):
            if isinstance(delta, BaseException):
                waits.append(None)
                continue
            if delta is None:  # the op changes nothing: nothing to store or replicate
                waits.append(Acks(0, 0, group))
                continue
            targets = targets_of.get(partition)
            if targets is None:
                targets = targets_of[partition] = [
                    (peer, self.link(peer) if peer in alive else None)
                    for peer in owners(partition) if peer != self.me]
            acks = Acks(needed, len(targets), group, level is Consistency.ALL)
            # the same item goes to every replica
            item = Delta(op.key, delta, None, acks, op.override_skew)
            for peer, link in targets:
                if link is None:
                    self._hint(peer, [item])
                elif not link.push_nowait(item):  # no checkpoint: a batch of ops fills one batch
                    await link.push(item)
            waits.append(acks)
        group.filled()
        if not done.is_set():
            # expired by the sweeper after request_timeout (no cancel scope per call: on the
            # single-write path a scope costs more than the rest of this function)
            self._ack_deadlines.append((trio.current_time() + self.config.request_timeout,
                                        done))
            await done.wait()
        outcomes: list[OpError | QuorumError | None] = []
        for op, result, waited in zip(ops, results, waits, strict=True):
            if waited is None:
                outcomes.append(result if isinstance(result, OpError) else QuorumError(
                    f"{op.kind} of {shown_key(op.key)} was not stored here: {result}"))
            elif not waited.met:
                outcomes.append(QuorumError(f"{op.kind} of {shown_key(op.key)} had fewer than "
                                            f"{needed + 1} acks"))
            else:
                outcomes.append(None)
        return outcomes

    async def _observe_removals(self, ops: list[Op], level: Consistency
                                ) -> dict[bytes, QuorumError] | None:
        """Removals are observed-remove: they take away what the replica applying them has
        seen. That replica may have missed a write another coordinator had acknowledged by
        two other replicas; so before a removal is made, the replica merges what a quorum of
        the key's replicas holds (R + W > N: it sees every quorum-acknowledged write). At
        level ONE nothing is read, as the caller asked. Returns the keys whose read fell
        short, each with its error (those removals fail), or None."""
        if level is Consistency.ONE or self.observe is None:
            return None
        keys = list(dict.fromkeys(op.key for op in ops
                                  if op.kind in REMOVALS and not op.override_skew))
        if not keys:
            return None
        try:
            states = await self.observe(keys, Consistency.QUORUM)
        except QuorumError as exc:
            return dict.fromkeys(keys, QuorumError(f"could not see the key's replicas before "
                                                   f"removing from it: {exc}"))
        seen = [(key, state) for key, state in zip(keys, states, strict=True)
                if state is not None]
        if seen:
            self.metrics["observed_removals"] += len(keys)
            await self.merge_quietly(seen, "observe before removal")
        return None

    async def ack_sweeper(self) -> None:
        """Ends the wait of writes whose replicas did not all answer within request_timeout
        (they then count as short of acks), and forgets finished groups."""
        deadlines = self._ack_deadlines
        while True:
            await trio.sleep(ACK_SWEEP_S)
            now = trio.current_time()
            while deadlines and (deadlines[0][0] <= now or deadlines[0][1].is_set()):
                deadlines.popleft()[1].set()

    # -- replicas that are down: hints -----------------------------------------------------
    def _hint(self, target: str, items: list[Delta]) -> None:
        """Hand deltas meant for `target` to the next live node after the preference list,
        or keep them here when there is none."""
        alive = self.placement.alive()
        ring = self.placement.ring
        for item in items:
            fallbacks = ring.fallbacks(ring.partition_of(item.key), 2)
            holders = [p for p in fallbacks if p in alive and p not in (target, self.me)]
            outcome = item.on_outcome
            if isinstance(outcome, Acks):
                outcome = outcome.via_fallback()
            hinted = Delta(item.key, item.delta, target, outcome, item.override)
            if holders and self.link(holders[0]).push_nowait(hinted):
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

    # -- links, sequences, local merges ------------------------------------------------------
    def link(self, peer: str) -> PeerLink:
        """The replication link to `peer` (started on first use)."""
        link = self.links.get(peer)
        if link is None:
            link = PeerLink(self.net, peer, self.config.max_batch, self.config.max_batch_bytes,
                            self.config.queue_per_peer,
                            self._on_link_failed, self.next_batch_seq)
            self.links[peer] = link
            self.spawn(link.run)
        return link

    def send_nowait(self, peer: str, item: Delta) -> None:
        """Send one repairing state to `peer` (this node: merged here) if its queue has room;
        otherwise anti-entropy repairs it later."""
        if peer == self.me:
            local: bytes | Replace = (Replace(item.delta, self.timebound.stale_check())
                                      if item.override else item.delta)
            self.spawn(self.merge_quietly, [(item.key, local)], "read repair")
        elif not self.link(peer).push_nowait(item):
            log.debug("replication queue to %s is full; anti-entropy will repair", peer)

    def next_batch_seq(self) -> int:
        """The sequence of the next kv-apply batch this node sends (any sender of it): unique
        and increasing across restarts, near the wall time in microseconds."""
        self._batch_seq = next_timed_seq(self._batch_seq, time.time_ns() // 1000)
        return self._batch_seq

    async def merge_quietly(self, items: Sequence[tuple[bytes, bytes | Replace]],
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

    def status(self) -> dict[str, int]:
        links = self.links.values()
        return {"replication_backlog": sum(link.backlog for link in links),
                "replication_batches": sum(link.batches for link in links),
                "replication_deltas": sum(link.sent for link in links),
                "oversized_dropped": sum(link.oversized for link in links)}

    # -- the replica's side ----------------------------------------------------------------
    def _refuse_batch(self, peer: str, reason: str, why: str) -> HandlerError:
        self.metrics["refused_batches"] += 1
        self.net.penalize(peer, reason)
        return HandlerError("refused", why)

    async def on_apply(self, peer: str, data: Any) -> Any:
        """A replication batch (kv-apply): states to merge here and hints to keep for others."""
        try:
            envelope = open_batch(self.net, data, peer, self.replay_guard,
                                  time.time_ns() // 1000)
        except EnvelopeError as exc:
            raise self._refuse_batch(peer, exc.reason, str(exc)) from None
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
                raise self._refuse_batch(peer, "malformed",
                                         "batch item is not [key, delta, hint_for]")
            key, delta, hint_for = item[:3]
            try:
                if self.timebound.beyond(delta, now_ms):
                    refused.append(index)
                    continue
            except crdt.DecodeError as exc:
                raise self._refuse_batch(peer, "malformed",
                                         f"batch cannot be merged: {exc}") from None
            if hint_for is None or hint_for == self.me:
                if len(item) == 4 and item[3]:  # an override: replace a state beyond the bound
                    stale = stale or self.timebound.stale_check()
                    direct.append((key, Replace(delta, stale)))
                else:
                    direct.append((key, delta))
            else:
                hinted.setdefault(hint_for, []).append((key, delta))
        self.authority.check_batch(peer, direct, hinted)
        if refused:
            self.metrics["skew_refused"] += len(refused)
            self.net.penalize(peer, "clock_skew")
            self.timebound.report(len(refused), "in a replication batch from", peer)
        try:
            await self.writer.merge(direct)
        except CorruptRecord as exc:
            if exc.where == "delta":  # what the peer sent cannot merge: its fault
                raise self._refuse_batch(peer, "malformed",
                                         f"batch cannot be merged: {exc}") from None
            # this node's stored state is corrupt
            raise self._unavailable(peer, "a replication batch", exc) from None
        except Exception as exc:  # this node's disk, its writer stopped, a shutdown
            raise self._unavailable(peer, "a replication batch", exc) from None
        for target, items in hinted.items():
            self.hints.add(target, items)
        return apply_reply(len(envelope.payload), refused)

    def _unavailable(self, peer: str, what: str, exc: Exception) -> HandlerError:
        """A request this node could not serve for a fault of its own: nobody is blamed. The
        sender of a batch keeps it (as hints) and sends it again; forwarded ops fail their
        quorum at the coordinator."""
        log.warning("%s from %s was not stored (a fault of this node): %s", what, peer, exc)
        return HandlerError("unavailable", f"this node could not store {what}: {exc}")

    async def on_ops(self, peer: str, message: Any) -> Any:
        """Groups of ops another coordinator forwarded (each group with its consistency
        level); answers, per group and op, None (applied with its quorum) or [code, why]."""
        groups: list[tuple[list[Op], Consistency]] = []
        try:
            wire_groups = message.get("groups") if isinstance(message, dict) else None
            if (not isinstance(wire_groups, list)
                    or not 0 < len(wire_groups) <= MAX_GROUPS_PER_REQUEST):
                raise OpError("bad_request", f"groups must be a list of 1 to "
                              f"{MAX_GROUPS_PER_REQUEST} groups")
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
        # the request's ops together apply to at most this much stored state; the rest are
        # answered "busy" (not applied) and the sender, which did nothing wrong, sends them
        # again in its next request (kv/forwarding.py)
        budget = StateBudget(self.config.max_request_state_bytes)

        async def run(index: int, ops: list[Op], level: Consistency) -> None:
            refused = refusals[index]
            outcomes = iter(await self.apply_and_replicate(
                [op for i, op in enumerate(ops) if i not in refused], level, budget=budget))
            replies[index] = [refused[i] if i in refused else _outcome(next(outcomes))
                              for i in range(len(ops))]

        try:
            async with trio.open_nursery() as nursery:  # one group commit for all groups
                for index, (ops, level) in enumerate(groups):
                    nursery.start_soon(run, index, ops, level)
        except Exception as exc:  # the group commit failed: this node's disk, writer, shutdown
            raise self._unavailable(peer, "forwarded ops", exc) from None
        if budget.refused:
            self.metrics["busy_ops"] += budget.refused
            log.info("%d of %d ops forwarded by %s left for its next request: they apply to "
                     "more than %d bytes of stored state", budget.refused, total, peer,
                     budget.limit)
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


def _outcome(result: OpError | QuorumError | None) -> list[Any] | None:
    """One op's answer to a kv-ops request: None (applied with its quorum) or [code, why]."""
    if result is None:
        return None
    return [result.code if isinstance(result, OpError) else "quorum", str(result)]
