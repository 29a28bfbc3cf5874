# Forwarding operations to the replica that applies them, coalesced: a coordinator that is
# not a replica of a key sends the op to one that is; ops bound for the same replica that
# wait at the same time travel in one request (one frame, one reply) instead of one each.
# Lives here: the per-replica queue, cutting requests by op count and bytes, spreading each
# request's per-op outcomes back to the calls that made them, withdrawing a call's ops not
# yet sent, and telling the caller whether the replica answered at all.
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
from .ops import Op

log = logging.getLogger(__name__)

OPS_PROTOCOL = "kv-ops"
MAX_OPS_PER_REQUEST = 10_000
OP_OVERHEAD_BYTES = 16  # an op's encoding beyond its key and arguments (kind, list headers)

Outcome = list[Any] | None  # None: applied with its quorum; else [error code, message]
UNREACHABLE = "unreachable"  # not sent: the op may go to another replica
OUTCOME_UNKNOWN = "outcome_unknown"  # sent, no answer: it may or may not have been applied

@dataclass
class Call:
    """One caller's ops and the outcomes gathered for them, chunk by chunk (`done` once all
    are in)."""

    outcomes: list[Outcome]
    pending: int = 0
    done: trio.Event = field(default_factory=trio.Event)

    def chunk_done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

@dataclass
class _Chunk:
    call: Call
    offset: int
    level: str
    wire: list[list[Any]]
    size: int
    # the coordinator's wall time (ms) after which the replica must not apply the chunk's
    # hedgeable ops, and whether they are a hedge (a copy of ops sent elsewhere first)
    apply_by: int | None = None
    hedge: bool = False

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

    async def submit(self, ops: list[Op], arg_sizes: list[int],
                     level: Consistency) -> list[Outcome]:
        """Run `ops` at the replica; one outcome per op (see `Outcome`, `UNREACHABLE`).
        `arg_sizes`: each op's encoded arguments in bytes (the coordinator measured them)."""
        call = self.enqueue(ops, arg_sizes, level)
        try:
            await call.done.wait()
        finally:
            self.withdraw(call)  # cancelled: what was not sent yet is not sent at all
        return call.outcomes

    def enqueue(self, ops: list[Op], arg_sizes: list[int], level: Consistency, *,
                apply_by: int | None = None, hedge: bool = False) -> Call:
        """Queue `ops` for the replica; the returned call is `done` when each has its outcome.
        `apply_by`, `hedge`: see _Chunk."""
        call = Call([None] * len(ops))
        chunk: list[list[Any]] = []
        size = offset = 0
        for index, (op, arg_size) in enumerate(zip(ops, arg_sizes, strict=True)):
            wire = op.to_wire()
            op_size = len(op.key) + arg_size + OP_OVERHEAD_BYTES
            if chunk and (size + op_size > self.max_bytes or len(chunk) >= MAX_OPS_PER_REQUEST):
                self._queue.append(_Chunk(call, offset, level.value, chunk, size, apply_by,
                                          hedge))
                call.pending += 1
                chunk, size, offset = [], 0, index
            chunk.append(wire)
            size += op_size
        self._queue.append(_Chunk(call, offset, level.value, chunk, size, apply_by, hedge))
        call.pending += 1
        self._wake.set()
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
            end = chunk.offset + len(chunk.wire)
            withdrawn.extend(range(chunk.offset, end))
            call.outcomes[chunk.offset:end] = [
                [UNREACHABLE, f"not sent: {self.peer} was still busy with earlier ops"]
            ] * len(chunk.wire)
            call.chunk_done()
        self._queue = kept
        return withdrawn

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                await self._send(self._take())

    def _take(self) -> list[_Chunk]:
        batch = [self._queue.popleft()]
        ops, size = len(batch[0].wire), batch[0].size
        while self._queue:
            chunk = self._queue[0]
            if (ops + len(chunk.wire) > MAX_OPS_PER_REQUEST
                    or size + chunk.size > self.max_bytes):
                break
            batch.append(self._queue.popleft())
            ops += len(chunk.wire)
            size += chunk.size
        return batch

    async def _send(self, batch: list[_Chunk]) -> None:
        groups: list[dict[str, Any]] = []
        for chunk in batch:
            group: dict[str, Any] = {"c": chunk.level, "ops": chunk.wire}
            if chunk.apply_by is not None:
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
        if self.on_answer is not None and (failure is None or failure[0] != UNREACHABLE):
            self.on_answer(self.peer, failure is None or failure[0] != OUTCOME_UNKNOWN)
        if failure is None and not _well_formed(replies, batch):
            failure = ["quorum", f"malformed reply from {self.peer}"]
        for position, chunk in enumerate(batch):
            outcomes = [failure] * len(chunk.wire) if failure is not None else replies[position]
            chunk.call.outcomes[chunk.offset:chunk.offset + len(chunk.wire)] = outcomes
            chunk.call.chunk_done()

def _well_formed(replies: Any, batch: list[_Chunk]) -> bool:
    return (isinstance(replies, list) and len(replies) == len(batch)
            and all(isinstance(r, list) and len(r) == len(c.wire)
                    and all(o is None or (isinstance(o, list) and len(o) == 2
                                          and isinstance(o[0], str) and isinstance(o[1], str))
                            for o in r)
                    for r, c in zip(replies, batch, strict=True)))
