# Group commit: every local write of the KV store goes through one task, which gathers what
# arrived meanwhile into one LevelDB batch with one synced write.
# Lives here: the job queue, the batching loop, read-modify-write of local mutations (a
# mutation reads the state left by earlier mutations of the same batch: a key's stored state
# is decoded once per batch, each mutation's delta merged into the decoded state, and the
# result encoded once, see KeyState), and running the synced disk write in the writer's own
# thread (diskthread.py) so the event loop keeps serving while the disk syncs.
# Replacing writes (an operator's override of a state beyond the clock skew bound) are decided
# here, inside the batch, so nothing lands between the look at the stored state and the write.
# Must not live here: replication, quorum counting, what operations mean (kv/ops.py).
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

import crdt
from shard.store import CorruptRecord, PlannedWrite

from .diskthread import DiskThread

log = logging.getLogger(__name__)


# What a mutation made: its delta encoded (what is replicated), the same delta decoded (what
# is merged into the key's state here), and whether it replaces the key's state instead of
# merging into it (an operator's override of a state beyond the clock skew bound). A plain
# tuple: one is made per op on the batched write path.
Made = tuple[bytes, crdt.State, bool]


class KeyState:
    """A key's state as the mutations of one batch see it, one after another: the stored
    bytes, decoded at most once, each mutation's delta merged into the decoded state, and
    encoded once, when the batch is written (`finish`: shard/store.py passes a KeyState from
    one update of the key to the next as a Pending state). Each mutation leaves a new one.
    `size` is the state's encoded size if known, else an upper bound (the last known size
    plus the deltas merged since: a merge leaves no more than its two inputs)."""

    __slots__ = ("_encoded", "_state", "size", "_grown")

    def __init__(self, encoded: bytes | None, state: crdt.State | None = None,
                 size: int | None = None) -> None:
        self._encoded = encoded
        self._state = state
        self.size = len(encoded) if encoded is not None else (size or 0)
        self._grown: tuple[crdt.State, crdt.State, bytes] | None = None

    @property
    def exists(self) -> bool:
        return self._encoded is not None or self._state is not None

    @property
    def encoded(self) -> bytes | None:
        """The state's canonical bytes (encoded now if a mutation changed it)."""
        if self._encoded is None and self._state is not None:
            self._encoded = crdt.encode(self._state)
            self.size = len(self._encoded)
        return self._encoded

    @property
    def state(self) -> Any:
        """The decoded state, or None for a key that holds nothing (DecodeError: corrupt)."""
        if self._state is None and self._encoded is not None:
            self._state = crdt.decode(self._encoded)
        return self._state

    def grown(self, delta: crdt.State) -> tuple[int, int]:
        """The exact encoded sizes of the state and of the state with `delta` merged (both
        encoded now: for a check near a size limit; `merged` reuses the merge)."""
        merged = self._merge(delta)
        encoded = crdt.encode(merged)
        self._grown = (delta, merged, encoded)
        return len(self.encoded or b""), len(encoded)

    def merged(self, made: Made) -> KeyState:
        """The state this mutation leaves."""
        encoded, delta, replace = made
        if replace or not self.exists:
            # a key's first state is the delta itself: it comes from crdt.encode, so it is
            # already canonical (what merge_encoded(None, delta) would check and repack)
            return KeyState(encoded, delta)
        if self._grown is not None and self._grown[0] is delta:
            return KeyState(self._grown[2], self._grown[1])
        return KeyState(None, self._merge(delta), self.size + len(encoded))

    def merged_bytes(self, made: Made) -> bytes:
        """The bytes of the state this mutation leaves (merged as bytes: for a key no other
        mutation of the batch changes)."""
        encoded, delta, replace = made
        if replace or (self._encoded is None and self._state is None):
            return encoded
        if self._grown is not None and self._grown[0] is delta:
            return self._grown[2]
        return crdt.merge_encoded(self.finish(), encoded)

    def _merge(self, delta: crdt.State) -> Any:
        state = self.state
        if state is None:
            return delta
        if type(state) is not type(delta):  # as crdt.merge_encoded says it
            raise crdt.DecodeError(f"cannot merge a {delta.TYPE_NAME} delta into a "
                                   f"{state.TYPE_NAME} state")
        return state.merge(delta)

    def finish(self) -> bytes:
        encoded = self.encoded
        assert encoded is not None, "a key with no state is never written"
        return encoded


# the key's state as the batch has it so far -> what the mutation made, or None when it
# changes nothing
Mutation = Callable[[KeyState], Made | None]


class Replace(NamedTuple):
    """A merge item that replaces the stored state when `stale(stored state)` holds, and
    merges into it as usual otherwise."""

    delta: bytes
    stale: Callable[[bytes], bool]


class WriterStopped(Exception):
    """The writer was stopped (the store is closing) before a job was written."""


@dataclass
class _Job:
    # merges: (key, delta or Replace)
    items: Sequence[tuple[bytes, bytes | Replace]] = field(default_factory=list)
    mutations: list[tuple[bytes, Mutation]] = field(default_factory=list)
    exclusive: Callable[[], Any] | None = None  # run alone, between batches
    done: trio.Event = field(default_factory=trio.Event)
    results: list[Any] = field(default_factory=list)  # per mutation: delta or exception
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return len(self.items) + len(self.mutations) + (self.exclusive is not None)


class GroupCommitWriter:
    """The only writer of a store. Each batch is planned (reads and merges) in the event
    loop, written with one fsync in a worker thread, then recorded in the hash tree; nothing
    else writes meanwhile, and readers see a batch only once it is durable."""

    def __init__(self, store: Any, max_batch: int = 2048, queue: int = 8192) -> None:
        self.store = store
        self.max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Job](queue)
        self.batches = 0
        self.writes = 0
        self._disk: DiskThread | None = None  # while run() runs

    async def merge(self, items: Sequence[tuple[bytes, bytes | Replace]]) -> None:
        """Merge deltas into the store (or replace stale states: see Replace); returns once
        they are durable."""
        if items:
            await self._submit(_Job(items=items))

    async def mutate(self, key: bytes, mutation: Mutation) -> bytes | None:
        """Apply a local mutation; returns its delta once it is durable (None: the mutation
        changed nothing)."""
        (result,) = await self.mutate_many([(key, mutation)])
        if isinstance(result, BaseException):
            raise result
        return None if result is None else bytes(result)

    async def mutate_many(self, mutations: list[tuple[bytes, Mutation]]) -> list[Any]:
        """Apply mutations in one group commit, in order; each result is its delta (bytes),
        None when it changed nothing, or the exception that refused it."""
        job = _Job(mutations=mutations)
        await self._submit(job)
        return job.results

    async def exclusive(self, action: Callable[[], Any]) -> Any:
        """Run `action()` (another write to the store, such as a partition drop) between two
        batches, so it never interleaves with a planned batch; returns what it returned."""
        job = _Job(exclusive=action)
        await self._submit(job)
        return job.results[0]

    async def _submit(self, job: _Job) -> None:
        await self._send.send(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error

    async def run(self) -> None:
        try:
            with DiskThread() as self._disk:
                await self._run()
        finally:
            self._disk = None

    async def _run(self) -> None:
        while True:
            jobs = [await self._receive.receive()]
            size = jobs[0].size
            while size < self.max_batch and jobs[0].exclusive is None:
                try:
                    job = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if job.exclusive is not None:
                    await self._commit(jobs)
                    jobs = [job]
                    break
                jobs.append(job)
                size += job.size
            if jobs[0].exclusive is not None:
                self._run_exclusive(jobs[0])
            else:
                await self._commit(jobs)
            await trio.lowlevel.checkpoint()

    def _run_exclusive(self, job: _Job) -> None:
        assert job.exclusive is not None
        try:
            job.results.append(job.exclusive())
        except Exception as exc:
            job.error = exc
        job.done.set()

    async def _commit(self, jobs: list[_Job]) -> None:
        """Write the jobs' batch; each job's `done` is set once its outcome (durable, or
        `error`) is known."""
        try:
            try:
                planned = self.store.plan_updates(self._updates(jobs))
            except CorruptRecord:
                # one bad item (a delta of another type, a corrupt record) must not fail the
                # rest: commit job by job so only the offending jobs see the error
                log.warning("a write batch of %d jobs failed; retrying job by job", len(jobs))
                for job in jobs:
                    job.results.clear()
                    try:
                        await self._write(self.store.plan_updates(self._updates([job])))
                    except Exception as exc:
                        job.error = exc
                    job.done.set()
            except Exception as exc:  # the store cannot be read: every job sees why
                log.error("a write batch of %d jobs failed: %s", len(jobs), exc)
                _fail(jobs, exc)
            else:
                try:
                    await self._write(planned)
                except Exception as exc:  # the disk write failed: nothing of it is stored
                    _fail(jobs, exc)
                for job in jobs:
                    job.done.set()
        finally:  # cancelled (shutdown) before an outcome was known: no waiter is left
            _fail([job for job in jobs if not job.done.is_set()],
                  WriterStopped("the store closed before this write was durable"))

    async def _write(self, planned: PlannedWrite) -> None:
        if not planned.changed:
            return
        # the call is not abandoned on cancel: a shutdown waits for the write to finish
        assert self._disk is not None, "run() is not running"
        batch = self.store.fill_planned(planned, True)
        await self._disk.call(self.store.write_filled, batch)
        self.store.record_planned(planned)
        self.batches += 1
        self.writes += len(planned.changed)

    def _updates(self, jobs: list[_Job]) -> list[tuple[bytes, Any]]:
        """What the store plans: deltas to merge as they are, mutations as updates."""
        updates: list[tuple[bytes, Any]] = []
        for job in jobs:
            for key, item in job.items:
                updates.append((key, self._replacing(key, item) if type(item) is Replace
                                else item))
        # keys that more than one mutation of the batch changes: those work on their decoded
        # state, encoded once at the end (a key changed once is merged as bytes: cheaper)
        keys = [key for job in jobs for key, _ in job.mutations]
        repeated = (frozenset() if len(set(keys)) == len(keys) else
                    frozenset(key for key, n in Counter(keys).items() if n > 1))
        for job in jobs:
            results = job.results
            for key, mutation in job.mutations:
                updates.append((key, _mutation_update(mutation, results, key in repeated)))
        return updates

    def _replacing(self, key: bytes, item: Replace) -> Callable[[Any], bytes]:
        merge = self.store.merge_checked

        def update(current: bytes | KeyState | None) -> bytes:
            if type(current) is KeyState:  # left by mutations earlier in the batch
                current = current.finish()
            assert current is None or type(current) is bytes
            if current is not None and item.stale(current):
                log.info("replaced the state of %r: it was beyond the clock skew bound", key)
                return merge(key, None, item.delta)  # checks the delta, as a merge would
            return merge(key, current, item.delta)
        return update


def _mutation_update(mutation: Mutation, results: list[Any], keep: bool
                     ) -> Callable[[bytes | KeyState | None], bytes | KeyState | None]:
    """The store's update for one mutation; `keep`: leave the key's state decoded for the
    batch's next mutations of it (a KeyState), else leave its bytes."""
    def update(current: bytes | KeyState | None) -> bytes | KeyState | None:
        state = current if type(current) is KeyState else KeyState(current)  # type: ignore[arg-type]
        try:
            made = mutation(state)
            new: bytes | KeyState | None
            if made is None:
                new = None
            elif keep:
                new = state.merged(made)
            else:
                new = state.merged_bytes(made)
        except Exception as exc:  # this op is refused; the rest of the batch goes on
            results.append(exc)
            # the state as it was, decoded if the op got that far, for the key's next ops
            return state if keep and state is not current and state.exists else None
        results.append(None if made is None else made[0])
        return new
    return update


def _fail(jobs: list[_Job], error: BaseException) -> None:
    for job in jobs:
        job.error = error
        job.done.set()
