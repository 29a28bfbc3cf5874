# Group commit: every local write of the KV store goes through one task, which gathers what
# arrived meanwhile into one LevelDB batch with one synced write.
# Lives here: the job queue, the batching loop, read-modify-write of local mutations (a
# mutation reads the state left by earlier mutations of the same batch), and running the
# synced disk write in the writer's own thread (diskthread.py) so the event loop keeps serving
# while the disk syncs.
# Replacing writes (an operator's override of a state beyond the clock skew bound) are decided
# here, inside the batch, so nothing lands between the look at the stored state and the write.
# Must not live here: replication, quorum counting, what operations mean (kv/ops.py).
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

import crdt
from shard.store import CorruptRecord, PlannedWrite

from .diskthread import DiskThread

log = logging.getLogger(__name__)

# current state -> delta (crdt.encode'd), or None when the mutation changes nothing
Mutation = Callable[[bytes | None], bytes | None]


class Replace(NamedTuple):
    """A merge item that replaces the stored state when `stale(stored state)` holds, and
    merges into it as usual otherwise."""

    delta: bytes
    stale: Callable[[bytes], bool]


class Replacement(bytes):
    """A mutation's delta that replaces the key's current state instead of merging into it."""


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
            for key, mutation in job.mutations:
                updates.append((key, _mutation_update(mutation, job.results)))
        return updates


    def _replacing(self, key: bytes, item: Replace) -> Callable[[bytes | None], bytes]:
        merge = self.store.merge_checked

        def update(current: bytes | None) -> bytes:
            if current is not None and item.stale(current):
                log.info("replaced the state of %r: it was beyond the clock skew bound", key)
                return merge(key, None, item.delta)  # checks the delta, as a merge would
            return merge(key, current, item.delta)
        return update


def _mutation_update(mutation: Mutation, results: list[Any]
                     ) -> Callable[[bytes | None], bytes | None]:
    def update(current: bytes | None) -> bytes | None:
        try:
            delta = mutation(current)
            # a key's first state is the delta itself: it comes from crdt.encode, so it is
            # already canonical (what merge_encoded(None, delta) would check and repack)
            new: bytes | None
            if type(delta) is Replacement:
                new = delta = bytes(delta)
            else:
                new = (delta if current is None or delta is None
                       else crdt.merge_encoded(current, delta))
        except Exception as exc:  # this op is refused; the rest of the batch goes on
            results.append(exc)
            return None
        results.append(delta)
        return new
    return update


def _fail(jobs: list[_Job], error: BaseException) -> None:
    for job in jobs:
        job.error = error
        job.done.set()
