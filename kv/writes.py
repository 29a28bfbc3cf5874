# The write path: from an operation to W acknowledgements, and the replica's side of it.
# Lives here: execute (group ops by the replica that applies them, run them here or forward
# them, retry unsent ones at the next replica, hedge ops safe to apply twice at the next
# replica when the first is silent, pass over replicas marked slow, tell an unknown outcome
# from a failure), applying ops here as their CRDT actor (a removal first merges what a
# quorum of replicas holds, so it removes every acked write), and pushing the deltas to the
# other replicas, counting acks (kv/quorum.py) against a deadline, hints to fallback nodes
# for replicas that are down, the per-peer replication links and forwarders, the node's
# batch sequences, local merges of repaired states, and the handlers of incoming
# replication batches (kv-apply) and forwarded ops (kv-ops, with their hedging deadlines).
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
from .config import Consistency, KVConfig, OutcomeUnknown, QuorumError
from .forwarding import (
    EXPIRED,
    MAX_GROUPS_PER_REQUEST,
    MAX_OPS_PER_REQUEST,
    OUTCOME_UNKNOWN,
    UNREACHABLE,
    Call,
    Forwarder,
    Outcome,
)
from .hints import HintStore
from .ops import (
    HEDGEABLE,
    REMOVALS,
    Op,
    OpError,
    StateBudget,
    check_growth_sized,
    check_op,
    make_delta,
    shown_key,
    type_name,
)
from .placement import Placement
from .quorum import AckGroup, Acks
from .replication import Delta, PeerLink, open_batch
from .timebound import TimeBound, apply_reply, wall_ms
from .writer import GroupCommitWriter, KeyState, Made, Replace

log = logging.getLogger(__name__)

ACK_SWEEP_S = 0.05  # how often write waits are checked against their deadline
# a forwarded call of more ops is never hedged: a large batch may take longer than the hedge
# delay to apply, and a copy of it doubles the work
HEDGE_MAX_OPS = 100
NOT_APPLIED = frozenset({UNREACHABLE, EXPIRED})
# what a forwarded op's error code means for the caller: the op itself is refused (OpError)
OP_CODES = frozenset({"wrong_type", "bad_request", "bad_value", "clock_skew", "too_large",
                      "not_hedged"})


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
        # replicas passed over as mutators: until when (trio time), and their incarnation then
        self._slow: dict[str, tuple[float, int]] = {}
        self._nursery: trio.Nursery | None = None
        self._ack_deadlines: deque[tuple[float, trio.Event]] = deque()  # in deadline order
        self._ack_waiting = trio.Event()  # set when a deadline joins an empty queue
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
    async def execute_many(self, ops: list[Op], level: Consistency) -> None:
        """Run operations: each goes to the first reachable replica of its key, which applies
        it (as the CRDT actor) and replicates it; returns when every op has W acks. Raises
        the op's error for one op (OpError, QuorumError, OutcomeUnknown), else QuorumError
        (OutcomeUnknown if every op that failed has an unknown outcome)."""
        self.authority.check_admitted()
        outcomes = await self._execute(ops, level, frozenset(), hedge=False)
        failed = [o for o in outcomes if o is not None]
        if not failed:
            self.metrics["writes"] += len(ops)
            return
        unknown = sum(isinstance(o, OutcomeUnknown) for o in failed)
        self.metrics["unknown_outcomes"] += unknown
        if len(ops) == 1:
            raise failed[0]
        refused = sum(isinstance(o, OpError) for o in failed)
        summary = (f"{len(failed)} of {len(ops)} ops failed ({refused} refused, {unknown} "
                   f"with an unknown outcome); first: {failed[0]}")
        raise OutcomeUnknown(summary) if unknown == len(failed) else QuorumError(summary)

    async def _execute(self, ops: list[Op], level: Consistency, avoid: frozenset[str],
                       hedge: bool) -> list[Exception | None]:
        """Per op, None once it has its W acks, else why not. Ops are grouped by the replica
        that applies them (their first live replica not in `avoid`); `hedge`: these ops were
        sent to another replica first (see _hedge)."""
        placement = self.placement
        groups: dict[str, list[int]] = {}  # per mutator, the indices of its ops
        sizes: list[int] = []  # each op's encoded arguments in bytes
        partitions: list[int] = []  # each op's partition
        results: list[Exception | None] = [None] * len(ops)
        alive = placement.alive()  # once per call, not per op
        slow = self._slow_peers()
        # per partition; the cached routes only when nothing is avoided
        mutators = self._routes(alive).mutators if not avoid and not slow else {}
        partition_of = placement.ring.partition_of
        for index, op in enumerate(ops):
            sizes.append(check_op(op, self.config.max_key_bytes, self.config.max_value_bytes))
            partition = partition_of(op.key)
            partitions.append(partition)
            if partition in mutators:
                mutator = mutators[partition]
            else:
                candidates = [p for p in placement.alive_replicas(op.key, alive)
                              if p not in avoid]
                # a replica marked slow applies only if no other is live
                candidates.sort(key=lambda p: p in slow)
                mutator = mutators[partition] = candidates[0] if candidates else None
            if mutator is None:
                results[index] = QuorumError(f"no replica of {shown_key(op.key)} is reachable")
                continue
            groups.setdefault(mutator, []).append(index)

        async def run_group(mutator: str, indices: list[int]) -> None:
            group = [ops[i] for i in indices]
            if mutator == self.me:
                outcomes: Sequence[Exception | None] = await self.apply_and_replicate(
                    group, level, [partitions[i] for i in indices], hedge=hedge)
            else:
                outcomes = await self._forward(mutator, group, [sizes[i] for i in indices],
                                               level, avoid, hedge)
            for i, outcome in zip(indices, outcomes, strict=True):
                results[i] = outcome

        if len(groups) == 1:  # the common case: no task of its own
            await run_group(*next(iter(groups.items())))
        elif groups:
            async with trio.open_nursery() as nursery:
                for mutator, indices in groups.items():
                    nursery.start_soon(run_group, mutator, indices)
        return results

    def _routes(self, alive: set[str]) -> _Routes:
        """The per-partition routes for the current ring and live members (a fresh, empty
        cache when either changed); the write path fills it as partitions come."""
        ring, members, routes = self._route_cache
        if ring is not self.placement.ring or members != alive:
            routes = _Routes()
            self._route_cache = (self.placement.ring, frozenset(alive), routes)
        return routes

    async def _forward(self, mutator: str, ops: list[Op], sizes: list[int], level: Consistency,
                       avoid: frozenset[str], hedge: bool) -> list[Exception | None]:
        """Run `ops` at `mutator` (another node); per op, None or why not. Ops it never got
        (unreachable, withdrawn, expired) run at the next replica; if it has not answered
        within hedge_after_s, the ops safe to apply twice go to the next replica too (_hedge).
        """
        forwarder = self._forwarder(mutator)
        delay = self.config.hedge_after_s
        may_hedge = (delay is not None and len(ops) <= HEDGE_MAX_OPS
                     and any(op.kind in HEDGEABLE for op in ops))
        if not may_hedge:
            outcomes = await forwarder.submit(ops, sizes, level)
            return await self._settle(mutator, ops, outcomes, level, avoid, hedge)
        assert delay is not None
        # the replica must not apply them after the moment they may be sent elsewhere: a late
        # copy would be stamped after writes made once this call was acknowledged. That moment
        # is `delay` after a request the replica leaves unanswered: one that answers, if only
        # `busy` (its request budget) while it works through a hot key, is not silent
        call = forwarder.enqueue(ops, sizes, level, hedge_after=delay, hedge=hedge)
        try:
            while not call.done.is_set():
                with trio.move_on_after(delay - (forwarder.out_for() or 0.0)):
                    await call.done.wait()
                out = forwarder.out_for()
                if not call.done.is_set() and out is not None and out >= delay:
                    return await self._hedge(mutator, forwarder, call, ops, level, avoid,
                                             hedge)
        finally:  # cancelled or hedged: what was not sent, or came back busy, stays here
            forwarder.abandon(call)
        return await self._settle(mutator, ops, call.outcomes, level, avoid, hedge)

    async def _settle(self, mutator: str, ops: list[Op], outcomes: list[Outcome],
                      level: Consistency, avoid: frozenset[str],
                      hedge: bool) -> list[Exception | None]:
        """The errors of a forwarded call's outcomes; ops `mutator` never applied run again at
        the next replica."""
        results = [_failure(mutator, op, o) for op, o in zip(ops, outcomes, strict=True)]
        again = [i for i, o in enumerate(outcomes) if o is not None and o[0] in NOT_APPLIED]
        if again:  # never applied, so never applied twice: the next replicas may apply them
            retried = await self._execute([ops[i] for i in again], level, avoid | {mutator},
                                          hedge)
            for i, result in zip(again, retried, strict=True):
                results[i] = result
        return results

    async def _hedge(self, mutator: str, forwarder: Forwarder, call: Call, ops: list[Op],
                     level: Consistency, avoid: frozenset[str],
                     hedge: bool) -> list[Exception | None]:
        """`mutator` has not answered within hedge_after_s. The call's ops still queued are
        withdrawn and run at the next replica; those sent, not answered yet and safe to apply
        twice (HEDGEABLE) are sent to the next replica too, and the first good answer counts;
        the others (incr) wait for `mutator`'s answer. Ops it answered already (a call is
        answered in parts: see forwarding.Call) keep their outcome. The mutator is marked
        slow."""
        self._mark_slow(mutator)
        withdrawn = set(forwarder.withdraw(call))
        out = [i for i in range(len(ops)) if i not in withdrawn and i not in call.answered]
        hedged = [i for i in out if ops[i].kind in HEDGEABLE]
        waiting = [i for i in out if ops[i].kind not in HEDGEABLE]
        self.metrics["hedged_ops"] += len(hedged)
        if hedged:
            log.info("%s has not answered %d forwarded ops in %.1f s: sending %d to the next "
                     "replica", mutator, len(out), self.config.hedge_after_s, len(hedged))
        second: dict[int, Exception | None] = {}  # the next replicas' outcomes, by index
        others = avoid | {mutator}
        withdrawn_done = not withdrawn
        hedges_done = False
        wake = trio.Event()

        def primary_ok(i: int) -> bool:
            return call.done.is_set() and call.outcomes[i] is None

        def finished() -> bool:
            if not withdrawn_done:
                return False
            if call.done.is_set():
                return hedges_done or all(primary_ok(i) for i in hedged)
            # the mutator has not answered: enough only if all it was sent is settled elsewhere
            return not waiting and hedges_done and all(second[i] is None for i in hedged)

        async def run_withdrawn() -> None:  # never sent: not a copy of anything
            nonlocal withdrawn_done
            indices = sorted(withdrawn)
            outcomes = await self._execute([ops[i] for i in indices], level, others, hedge)
            second.update(zip(indices, outcomes, strict=True))
            withdrawn_done = True
            wake.set()

        async def run_hedges() -> None:
            nonlocal hedges_done
            outcomes = await self._execute([ops[i] for i in hedged], level, others, True)
            second.update(zip(hedged, outcomes, strict=True))
            hedges_done = True
            wake.set()

        async def watch_mutator() -> None:
            await call.done.wait()
            wake.set()

        async with trio.open_nursery() as nursery:
            if withdrawn:
                nursery.start_soon(run_withdrawn)
            if hedged:
                nursery.start_soon(run_hedges)
            else:
                hedges_done = True
            nursery.start_soon(watch_mutator)
            # each task ends by its own timeouts, so this ends too
            while not finished():
                await wake.wait()
                wake = trio.Event()
            nursery.cancel_scope.cancel()  # a slower copy's answer is not needed
        results: dict[int, Exception | None] = {}
        rest: list[int] = []  # answered before the hedge, or waited for (incr): as unhedged
        for i, op in enumerate(ops):
            if i in withdrawn:
                results[i] = second[i]
            elif i in hedged:
                if primary_ok(i) or second.get(i, False) is None:
                    results[i] = None
                else:  # both failed (the mutator has answered: see finished)
                    outcome = call.outcomes[i]
                    # the mutator's error, unless it did not apply the op at all
                    results[i] = (second.get(i) if outcome is not None
                                  and outcome[0] in NOT_APPLIED
                                  else _failure(mutator, op, outcome))
            else:
                rest.append(i)
        if rest:
            settled = await self._settle(mutator, [ops[i] for i in rest],
                                         [call.outcomes[i] for i in rest], level, avoid, hedge)
            results.update(zip(rest, settled, strict=True))
        return [results[i] for i in range(len(ops))]

    # -- replicas that keep writes waiting -------------------------------------------------
    def _mark_slow(self, peer: str) -> None:
        """Pass `peer` over as the replica that applies writes for slow_mark_s (it kept a
        forwarded write waiting past hedge_after_s), unless it answers or restarts sooner."""
        if self.config.slow_mark_s <= 0:
            return
        member = self.net.view.get(peer)
        if peer not in self._slow:
            self.metrics["slow_marks"] += 1
        self._slow[peer] = (trio.current_time() + self.config.slow_mark_s,
                            member.incarnation if member is not None else 0)

    def _on_forward_answer(self, peer: str, answered: bool) -> None:
        if answered:
            self._slow.pop(peer, None)  # it answers again

    def _slow_peers(self) -> set[str]:
        """The replicas marked slow now (a mark ends when due, or when SWIM has the peer back
        at a newer incarnation: it restarted)."""
        if not self._slow:
            return set()
        now = trio.current_time()
        view = self.net.view
        for peer, (until, incarnation) in list(self._slow.items()):
            member = view.get(peer)
            if until <= now or (member is not None and member.incarnation > incarnation):
                del self._slow[peer]
        return set(self._slow)

    def _forwarder(self, peer: str) -> Forwarder:
        forwarder = self._forwarders.get(peer)
        if forwarder is None:
            forwarder = Forwarder(self.net, peer, self.config.max_batch_bytes,
                                  self.config.request_timeout * 2, self._on_forward_answer)
            self._forwarders[peer] = forwarder
            self.spawn(forwarder.run)
        return forwarder

    # -- applying here as the CRDT actor ---------------------------------------------------
    async def apply_and_replicate(self, ops: list[Op], level: Consistency,
                                  partitions: list[int] | None = None, *,
                                  apply_by: int | None = None, hedge: bool = False,
                                  budget: StateBudget | None = None
                                  ) -> list[OpError | QuorumError | None]:
        """Apply `ops` here (this node is their CRDT actor) and replicate them; per op, None
        when it has its W acks, else why not. `partitions`: each op's partition, if known.
        A forwarded call may be hedged (see _hedge): `apply_by` is the coordinator's wall
        time (ms) after which its HEDGEABLE ops are not applied (`expired`: the coordinator
        may have sent them elsewhere by then); `hedge`: these ops are such a second copy, so
        a delete of a counter (not safe to apply twice) is refused (`not_hedged`).
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
                # the deadline is checked here, as the op is about to be stamped (after the
                # budget: an op the budget refuses is `busy`, never applied, whatever its time)
                if apply_by is not None or hedge:
                    self._check_hedged(op, state, apply_by, hedge)
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
            self._ack_waiting.set()
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

    def _check_hedged(self, op: Op, state: Any, apply_by: int | None, hedge: bool) -> None:
        """Refuse a hedged op that must not apply here (see apply_and_replicate)."""
        if op.kind == "delete" and state is not None and type_name(state) == "pncounter":
            if hedge:  # the first replica may apply it: decremented twice
                raise OpError("not_hedged", f"a delete of the counter {shown_key(op.key)} is "
                              "not sent to two replicas")
            return  # never hedged, so no deadline
        if apply_by is not None and op.kind in HEDGEABLE and wall_ms() > apply_by:
            self.metrics["expired_ops"] += 1
            raise OpError(EXPIRED, f"{op.kind} of {shown_key(op.key)} arrived "
                          f"{wall_ms() - apply_by} ms after its deadline (this replica was "
                          "paused or slow, or its clock is ahead of the coordinator's); not "
                          "applied")

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
        (they then count as short of acks), and forgets finished groups. Sleeps while no
        write waits (an idle node does not wake for it)."""
        deadlines = self._ack_deadlines
        while True:
            if not deadlines:
                self._ack_waiting = trio.Event()
                await self._ack_waiting.wait()
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

    def retire_peers(self, ring_members: set[str]) -> None:
        """After a ring change: the links and forwarders to peers outside the ring end once
        they have sent what they hold (a member that left or was forgotten after its death; a
        fresh identity per member under the open rule would otherwise leave a task each)."""
        for peer in [p for p in self.links if p not in ring_members]:
            self.links.pop(peer).close()
        for peer in [p for p in self._forwarders if p not in ring_members]:
            self._forwarders.pop(peer).close()
        for peer in [p for p in self._slow if p not in ring_members]:
            del self._slow[peer]

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
                # kept for another node, which merges it only later: it must be a state now
                # (the wall-time check above reads no further than the wall), or the target
                # would refuse it then and blame this node, which delivers it
                try:
                    crdt.decode(delta)
                except crdt.DecodeError as exc:
                    raise self._refuse_batch(peer, "malformed",
                                             f"hinted item is not a state: {exc}") from None
                hinted.setdefault(hint_for, []).append((key, delta))
        self.authority.check_batch(peer, direct, hinted)
        if refused:
            self.metrics["skew_refused"] += len(refused)
            self.net.penalize(peer, "clock_skew")
            self.timebound.report(len(refused), "in a replication batch from", peer)
        try:
            await self.writer.merge(direct)
        except CorruptRecord as exc:
            if exc.where == "delta":
                if _sound_states(exc.key, direct):
                    raise self._type_conflict(peer, exc) from None
                # what the peer sent cannot merge: its fault
                raise self._refuse_batch(peer, "malformed",
                                         f"batch cannot be merged: {exc}") from None
            # this node's stored state is corrupt
            raise self._unavailable(peer, "a replication batch", exc) from None
        except Exception as exc:  # this node's disk, its writer stopped, a shutdown
            raise self._unavailable(peer, "a replication batch", exc) from None
        for target, items in hinted.items():
            self.hints.add(target, items)
        return apply_reply(len(envelope.payload), refused)

    def _type_conflict(self, peer: str, exc: CorruptRecord) -> HandlerError:
        """A batch whose state for a key is sound but of another type than the one stored
        here (concurrent first writes of two types, or a hint of one): refused as a batch
        that cannot merge, so its sender drops that item (hints are bisected down to it),
        and nobody is blamed: honest nodes send such states."""
        self.metrics["refused_batches"] += 1
        self.metrics["type_conflicts"] += 1
        log.warning("type conflict on %s in a replication batch from %s: %s",
                    shown_key(exc.key), peer, exc.cause)
        return HandlerError("refused", f"batch cannot be merged: type conflict: {exc.cause}")

    def _unavailable(self, peer: str, what: str, exc: Exception) -> HandlerError:
        """A request this node could not serve for a fault of its own: nobody is blamed. The
        sender of a batch keeps it (as hints) and sends it again; forwarded ops fail their
        quorum at the coordinator."""
        log.warning("%s from %s was not stored (a fault of this node): %s", what, peer, exc)
        return HandlerError("unavailable", f"this node could not store {what}: {exc}")

    async def on_ops(self, peer: str, message: Any) -> Any:
        """Groups of ops another coordinator forwarded (each group with its consistency
        level); answers, per group and op, None (applied with its quorum) or [code, why]."""
        groups: list[tuple[list[Op], Consistency, int | None, bool]] = []
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
                apply_by, hedge = group.get("by"), group.get("h", False)
                if not ((apply_by is None or type(apply_by) is int) and type(hedge) is bool):
                    raise OpError("bad_request", "a group's by must be an integer, h a bool")
                groups.append(([Op.from_wire(w) for w in wire_ops],
                               Consistency(group.get("c", "quorum")), apply_by, hedge))
            if total > MAX_OPS_PER_REQUEST:
                raise OpError("bad_request", f"more than {MAX_OPS_PER_REQUEST} operations")
        except (OpError, ValueError) as exc:
            raise HandlerError("bad_request", str(exc)) from None
        replies: list[list[Any]] = [[] for _ in groups]
        refusals = [self._screen_ops(peer, group[0]) for group in groups]
        # the request's ops together apply to at most this much stored state; the rest are
        # answered "busy" (not applied) and the sender, which did nothing wrong, sends them
        # again in its next request (kv/forwarding.py)
        budget = StateBudget(self.config.max_request_state_bytes)

        async def run(index: int, ops: list[Op], level: Consistency, apply_by: int | None,
                      hedge: bool) -> None:
            refused = refusals[index]
            outcomes = iter(await self.apply_and_replicate(
                [op for i, op in enumerate(ops) if i not in refused], level,
                apply_by=apply_by, hedge=hedge, budget=budget))
            replies[index] = [refused[i] if i in refused else _outcome(next(outcomes))
                              for i in range(len(ops))]

        try:
            async with trio.open_nursery() as nursery:  # one group commit for all groups
                for index, (ops, level, apply_by, hedge) in enumerate(groups):
                    nursery.start_soon(run, index, ops, level, apply_by, hedge)
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


def _sound_states(key: bytes, items: Sequence[tuple[bytes, bytes | Replace]]) -> bool:
    """Whether every state of `key` among `items` decodes on its own (a merge of them that
    failed then failed on their types, not on a corrupt encoding)."""
    try:
        for item_key, item in items:
            if item_key == key:
                crdt.decode(item.delta if isinstance(item, Replace) else item)
    except crdt.DecodeError:
        return False
    return True


def _failure(mutator: str, op: Op, outcome: Outcome) -> Exception | None:
    """The error a forwarded op's outcome stands for (None: applied with its quorum)."""
    if outcome is None:
        return None
    code, message = outcome
    if code in OP_CODES:
        return OpError(code, message)
    if code == OUTCOME_UNKNOWN:
        return OutcomeUnknown(f"{op.kind} of {shown_key(op.key)}: the outcome is unknown, it "
                              f"may or may not have been applied ({message})")
    return QuorumError(f"{op.kind} of {shown_key(op.key)} failed at {mutator}: {code}: "
                       f"{message}")


def _outcome(result: OpError | QuorumError | None) -> list[Any] | None:
    """One op's answer to a kv-ops request: None (applied with its quorum) or [code, why]."""
    if result is None:
        return None
    return [result.code if isinstance(result, OpError) else "quorum", str(result)]
