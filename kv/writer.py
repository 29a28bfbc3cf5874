# Group commit: every local write of the KV store goes through one task, which gathers what
# arrived meanwhile into one LevelDB batch with one synced write.
# Lives here: the job queue, the batching loop, and read-modify-write of local mutations
# (a mutation reads the state left by earlier mutations of the same batch).
# Must not live here: replication, quorum counting, what operations mean (kv/ops.py).
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import crdt

log = logging.getLogger(__name__)

Mutation = Callable[[bytes | None], bytes]  # current state -> delta (encoded)


@dataclass
class _Job:
    items: list[tuple[bytes, bytes]] = field(default_factory=list)  # merges: (key, delta)
    mutations: list[tuple[bytes, Mutation]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    results: list[Any] = field(default_factory=list)  # per mutation: delta or exception
    error: BaseException | None = None


class GroupCommitWriter:
    def __init__(self, store: Any, max_batch: int = 2048, queue: int = 8192) -> None:
        self.store = store
        self.max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Job](queue)
        self.batches = 0
        self.writes = 0

    async def merge(self, items: list[tuple[bytes, bytes]]) -> None:
        """Merge deltas into the store; returns once they are durable."""
        if items:
            await self._submit(_Job(items=items))

    async def mutate(self, key: bytes, mutation: Mutation) -> bytes:
        """Apply a local mutation; returns its delta once it is durable."""
        (result,) = await self.mutate_many([(key, mutation)])
        if isinstance(result, BaseException):
            raise result
        return bytes(result)

    async def mutate_many(self, mutations: list[tuple[bytes, Mutation]]) -> list[Any]:
        """Apply mutations in one group commit, in order; each result is its delta (bytes)
        or the exception that refused it."""
        job = _Job(mutations=mutations)
        await self._submit(job)
        return job.results

    async def _submit(self, job: _Job) -> None:
        await self._send.send(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error

    async def run(self) -> None:
        while True:
            jobs = [await self._receive.receive()]
            size = len(jobs[0].items) + len(jobs[0].mutations)
            while size < self.max_batch:
                try:
                    job = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                jobs.append(job)
                size += len(job.items) + len(job.mutations)
            self._commit(jobs)
            await trio.lowlevel.checkpoint()

    def _commit(self, jobs: list[_Job]) -> None:
        items: list[tuple[bytes, bytes]] = []
        overlay: dict[bytes, bytes | None] = {}
        for job in jobs:
            items.extend(job.items)
            for key, mutation in job.mutations:
                try:
                    current = overlay[key] if key in overlay else self.store.get(key)
                    delta = mutation(current)
                    overlay[key] = crdt.merge_encoded(current, delta)
                except Exception as exc:  # this op is refused; the rest of the batch goes on
                    job.results.append(exc)
                    continue
                job.results.append(delta)
                items.append((key, delta))
        try:
            if items:
                self.store.apply_deltas(items, sync=True)
                self.batches += 1
                self.writes += len(items)
        except Exception:
            # one bad item (a delta of another type, a corrupt record) must not fail the rest:
            # commit job by job so only the offending jobs see the error
            log.warning("a write batch of %d items failed; retrying job by job", len(items))
            for job in jobs:
                job_items = job.items + [(k, d) for (k, _), d in zip(job.mutations, job.results,
                                                                     strict=True)
                                         if isinstance(d, bytes)]
                try:
                    self.store.apply_deltas(job_items, sync=True)
                    self.writes += len(job_items)
                except Exception as exc:
                    job.error = exc
        for job in jobs:
            job.done.set()
