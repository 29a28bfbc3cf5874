# Forwarding operations to the replica that applies them, coalesced: a coordinator that is
# not a replica of a key sends the op to one that is; ops bound for the same replica that
# wait at the same time travel in one request (one frame, one reply) instead of one each.
# Lives here: the per-replica queue, cutting requests by op count and bytes, spreading each
# request's per-op outcomes back to the calls that made them, sending again, in the next
# requests, the ops a replica left unapplied for its per-request budget (`busy`: see
# KVConfig.max_request_state_bytes) cut to what it applied in one request, withdrawing a
# call's ops not yet sent, noting which of a call's ops have their final outcome (a call is
# answered in parts), and telling the caller whether the replica answered at all.
# Must not live here: what an op does or how quorum is counted (kv/writes.py runs them).
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2p import Network, PeerUnreachable, RemoteError, RequestError

from .config import Consistency
from .hints import wall_ms
from .ops import BUSY, Op

log = logging.getLogger(__name__)

OPS_PROTOCOL = "kv-ops"
MAX_OPS_PER_REQUEST = 10_000
MAX_GROUPS_PER_REQUEST = 100  # a group: one call's ops (one consistency level)
OP_OVERHEAD_BYTES = 16  # an op's encoding beyond its key and arguments (kind, list headers)

Outcome = list[Any] | None  # None: applied with its quorum; else [error code, message]
UNREACHABLE = "unreachable"  # not sent: the op may go to another replica
OUTCOME_UNKNOWN = "outcome_unknown"  # sent, no answer: it may or may not have been applied
EXPIRED = "expired"  # a forwarded op not applied by its chunk's deadline: never applied

@dataclass
class Call:
    """One caller's ops and the outcomes gathered for them, chunk by chunk (`done` once all
    are in). A call is answered in parts: one cut into several requests (by bytes), or with
    ops a replica left `busy` and that are sent again; `answered` holds the places whose
    outcome is final, also before `done`."""

    outcomes: list[Outcome]
    pending: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    answered: set[int] = field(default_factory=set)
    # nobody waits for it any more (see Forwarder.abandon): its busy ops are not sent again
    abandoned: bool = False

    def chunk_done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

@dataclass
class _Chunk:
    call: Call
    positions: list[int]  # each op's place in the call
    level: str
    wire: list[list[Any]]
    sizes: list[int]  # each op's bytes
    size: int
    # how long (s) after the chunk is sent the replica may still apply its hedgeable ops
    # (None: no limit), the coordinator's wall time (ms) that gives when it is sent (a busy
    # op sent again gets a new one: the coordinator hedges only a request that went
    # unanswered this long, see Forwarder.out_for), and whether the ops are a hedge (a copy
    # of ops sent elsewhere first)
    hedge_after: float | None = None
    apply_by: int | None = None
    hedge: bool = False
    alone: bool = False  # sent again after `busy`: in a request of its own

class Forwarder:
    """The queue of ops bound for one replica, drained one request at a time: what arrives
    while a request is out leaves together in the next."""

    def __init__(self, net: Network, peer: str, max_bytes: int, timeout: float,
                 on_answer: Callable[[str, bool], None] | None = None) -> None:
        self.net = net
        self.peer = peer
        self.max_bytes = max_bytes
        self.timeout = timeout
        # told after each request: (peer, True) when the replica answered, False when it was
        # sent and the replica did not answer in time
        self.on_answer = on_answer
        self._queue: deque[_Chunk] = deque()
        self._wake = trio.Event()
        self._sent_at: float | None = None  # trio time the request out now left (None: none)
        self._closing = False  # see close()
        self._ended = False  # the drainer returned after close(): calls get UNREACHABLE

    async def submit(self, ops: list[Op], arg_sizes: list[int],
                     level: Consistency) -> list[Outcome]:
        """Run `ops` at the replica; one outcome per op (see `Outcome`, `UNREACHABLE`).
        `arg_sizes`: each op's encoded arguments in bytes (the coordinator measured them)."""
        call = self.enqueue(ops, arg_sizes, level)
        try:
            await call.done.wait()
        finally:
            self.abandon(call)  # cancelled: what was not sent yet is not sent at all
        return call.outcomes

    def enqueue(self, ops: list[Op], arg_sizes: list[int], level: Consistency, *,
                hedge_after: float | None = None, hedge: bool = False) -> Call:
        """Queue `ops` for the replica; the returned call is `done` when each has its outcome.
        `hedge_after`, `hedge`: see _Chunk."""
        call = Call([None] * len(ops))
        chunk: list[list[Any]] = []
        sizes: list[int] = []
        size = offset = 0
        for index, (op, arg_size) in enumerate(zip(ops, arg_sizes, strict=True)):
            wire = op.to_wire()
            op_size = len(op.key) + arg_size + OP_OVERHEAD_BYTES
            if chunk and (size + op_size > self.max_bytes or len(chunk) >= MAX_OPS_PER_REQUEST):
                self._queue.append(_Chunk(call, list(range(offset, index)), level.value, chunk,
                                          sizes, size, hedge_after, hedge=hedge))
                call.pending += 1
                chunk, sizes, size, offset = [], [], 0, index
            chunk.append(wire)
            sizes.append(op_size)
            size += op_size
        self._queue.append(_Chunk(call, list(range(offset, len(ops))), level.value, chunk,
                                  sizes, size, hedge_after, hedge=hedge))
        call.pending += 1
        self._wake.set()
        if self._ended:  # retired (the replica left the ring) while a caller held it
            self.withdraw(call)
        return call

    def withdraw(self, call: Call) -> list[int]:
        """Take the call's ops that are still queued (not sent) out of the queue; they get the
        outcome UNREACHABLE. Returns their indices in the call."""
        if call.done.is_set() or not any(chunk.call is call for chunk in self._queue):
            return []
        kept: deque[_Chunk] = deque()
        withdrawn: list[int] = []
        for chunk in self._queue:
            if chunk.call is not call:
                kept.append(chunk)
                continue
            withdrawn.extend(chunk.positions)
            for place in chunk.positions:
                call.outcomes[place] = [UNREACHABLE,
                                        f"not sent: {self.peer} was still busy with earlier ops"]
            call.answered.update(chunk.positions)
            call.chunk_done()
        self._queue = kept
        return withdrawn

    def abandon(self, call: Call) -> None:
        """The caller no longer waits for `call` (it was cancelled, or settled its ops
        elsewhere): its queued ops are withdrawn, and ops of it a request out now brings back
        `busy` are not sent again. Such an op would be applied whenever its turn came, with a
        new deadline: after the caller had its answer, and (a hedge's copy) stamped after
        writes made once the other copy was acknowledged."""
        call.abandoned = True
        self.withdraw(call)

    def out_for(self) -> float | None:
        """How long (s) the request out now has waited for the replica's answer; None when
        none is out. A replica that keeps answering (even `busy`) is not silent."""
        return None if self._sent_at is None else trio.current_time() - self._sent_at

    def close(self) -> None:
        """The replica left the ring: what is queued is still sent, then the drainer ends."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                await self._send(self._take())
            if self._closing:
                self._ended = True
                return

    def _take(self) -> list[_Chunk]:
        batch = [self._queue.popleft()]
        ops, size = len(batch[0].wire), batch[0].size
        while self._queue and not batch[0].alone:
            chunk = self._queue[0]
            if (chunk.alone or ops + len(chunk.wire) > MAX_OPS_PER_REQUEST
                    or size + chunk.size > self.max_bytes
                    or len(batch) >= MAX_GROUPS_PER_REQUEST):
                break
            batch.append(self._queue.popleft())
            ops += len(chunk.wire)
            size += chunk.size
        return batch

    async def _send(self, batch: list[_Chunk]) -> None:
        groups: list[dict[str, Any]] = []
        self._sent_at = sent_at = trio.current_time()
        for chunk in batch:
            group: dict[str, Any] = {"c": chunk.level, "ops": chunk.wire}
            if chunk.hedge_after is not None:
                chunk.apply_by = wall_ms() + int(chunk.hedge_after * 1000)
                group["by"] = chunk.apply_by
            if chunk.hedge:
                group["h"] = True
            groups.append(group)
        failure: Outcome = None
        replies: Any = None
        try:
            replies = await self.net.request(self.peer, OPS_PROTOCOL, {"groups": groups},
                                             timeout=self.timeout)
        except PeerUnreachable as exc:  # nothing was sent: another replica may apply them
            failure = [UNREACHABLE, str(exc)]
        except RemoteError as exc:
            failure = [exc.code, exc.message]
        except RequestError as exc:
            # sent but no answer: the ops may or may not have been applied, so they are not
            # acknowledged (a retry is safe for puts and sets, may double an increment)
            failure = [OUTCOME_UNKNOWN, f"no answer from {self.peer}: {exc}"]
        finally:
            self._sent_at = None
        out = trio.current_time() - sent_at
        if self.on_answer is not None and (failure is None or failure[0] != UNREACHABLE):
            self.on_answer(self.peer, failure is None or failure[0] != OUTCOME_UNKNOWN)
        if failure is None and not _well_formed(replies, batch):
            failure = ["quorum", f"malformed reply from {self.peer}"]
        busy: list[list[int]] = [[] for _ in batch]  # per chunk, its ops left unapplied
        if failure is None:
            busy = [[i for i, o in enumerate(reply) if o is not None and o[0] == BUSY]
                    for reply in replies]
        left = sum(len(b) for b in busy)
        applied = sum(len(chunk.wire) for chunk in batch) - left
        again: list[_Chunk] = []
        for position, chunk in enumerate(batch):
            outcomes = [failure] * len(chunk.wire) if failure is not None else replies[position]
            for place, outcome in zip(chunk.positions, outcomes, strict=True):
                chunk.call.outcomes[place] = outcome
            sent_again: set[int] = set()
            # progress: send them again (else they fail busy), unless nobody waits for them
            if busy[position] and applied and not chunk.call.abandoned:
                if chunk.hedge_after is not None and out >= chunk.hedge_after:
                    # not applied, and answered after the deadline the replica would refuse
                    # them by: the caller may have hedged them (out_for), so they are not sent
                    # here again; it runs them at the next replica (never applied here, so
                    # never applied twice)
                    for i in busy[position]:
                        chunk.call.outcomes[chunk.positions[i]] = [
                            EXPIRED, f"{self.peer} left it for a request after its deadline"]
                else:
                    again += self._cut(chunk, busy[position], applied)
                    sent_again = {chunk.positions[i] for i in busy[position]}
            chunk.call.answered.update(p for p in chunk.positions if p not in sent_again)
            chunk.call.chunk_done()
        if left and applied:
            log.debug("%s left %d of %d ops for the next request (its request budget)",
                      self.peer, left, left + applied)
        for chunk in reversed(again):  # next, before what came later: order stays per call
            self._queue.appendleft(chunk)

    @staticmethod
    def _cut(chunk: _Chunk, indices: list[int], fit: int) -> list[_Chunk]:
        """The ops of `chunk` at `indices`, again, in requests of `fit` ops (what the replica
        applied of the last one), each counted as pending in its call."""
        pieces = []
        for start in range(0, len(indices), fit):
            part = indices[start:start + fit]
            sizes = [chunk.sizes[i] for i in part]
            pieces.append(_Chunk(chunk.call, [chunk.positions[i] for i in part], chunk.level,
                                 [chunk.wire[i] for i in part], sizes, sum(sizes),
                                 chunk.hedge_after, hedge=chunk.hedge, alone=True))
        chunk.call.pending += len(pieces)
        return pieces

def _well_formed(replies: Any, batch: list[_Chunk]) -> bool:
    return (isinstance(replies, list) and len(replies) == len(batch)
            and all(isinstance(r, list) and len(r) == len(c.wire)
                    and all(o is None or (isinstance(o, list) and len(o) == 2
                                          and isinstance(o[0], str) and isinstance(o[1], str))
                            for o in r)
                    for r, c in zip(replies, batch, strict=True)))
