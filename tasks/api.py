# The task author API: what a task is (a class with setup/task/submission/audit/distribution),
# what it may use while it runs (TaskContext, StorageProver), and the code-hash check that
# ties installed task code to the hash recorded on chain when the task was created.
# Lives here: those interfaces, the `Task` base class with its default distribution, and
# `code_hash` / `check_code_hash`.
# Must not live here: running task code (runner.py), round timing (engine.py), anything that
# does I/O by itself (the node implements TaskContext and StorageProver).
from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

MAX_SUBMISSION_BYTES = 512  # a submission's UTF-8 size limit, checked on chain as well


@runtime_checkable
class StorageProver(Protocol):
    """The node's view of the replicated store's partitions, for storage-proof tasks.

    `digest(partition, challenge)` must be the same on every replica holding the same data:
    e.g. sha256(challenge || the partition's Merkle segment hashes). Replicas converge but are
    not equal at every instant, so a task should digest at a moment both sides agree on (the
    storage task digests at the start of the round, on every replica), not when each looks.
    """

    def owned_partitions(self) -> list[int]:
        """The partitions this node replicates, per the current ring."""
        ...

    def members(self) -> list[str]:
        """The node ids the current ring places partitions on."""
        ...

    def partitions_of(self, node_id: str) -> list[int]:
        """The partitions `node_id` replicates, per the current ring."""
        ...

    def replicas_of(self, partition: int) -> list[str]:
        """The node ids replicating `partition`, per the current ring."""
        ...

    async def digest(self, partition: int, challenge: bytes) -> bytes:
        """A digest of this node's copy of `partition`, bound to `challenge`."""
        ...


class TaskContext(Protocol):
    """What a running task may use; the node implements it, one per task.

    Keys given to get/put are scoped to this node's namespace of the task (the node prefixes
    them with the task id and its node id); a task cannot read or write another task's keys,
    or another node's, through it: what other nodes must read goes through blobs.
    """

    @property
    def task_id(self) -> str: ...

    @property
    def round(self) -> int:
        """The round the node is in when the current call started."""
        ...

    @property
    def window(self) -> str:
        """"submission", "audit" or "idle": where `round` is when the current call started."""
        ...

    @property
    def node_id(self) -> str:
        """This node's id (its account on the chain)."""
        ...

    @property
    def log(self) -> logging.Logger: ...

    @property
    def storage(self) -> StorageProver | None:
        """The store's partition prover (None when the node has no store)."""
        ...

    async def get(self, key: str) -> Any:
        """The value under `key` in the task's namespace (None when missing)."""
        ...

    async def put(self, key: str, value: Any) -> None: ...

    def sign(self, data: bytes) -> bytes:
        """A signature of `data` by this node's key."""
        ...

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool:
        """True when `signature` is `node_id`'s signature of `data`."""
        ...

    async def put_blob(self, data: bytes) -> str:
        """Store `data` in the replicated store; returns its cid (tasks.blobs.cid_of)."""
        ...

    async def get_blob(self, cid: str) -> bytes:
        """The blob named by `cid`, checked against it; raises KeyError when not found."""
        ...


class Task:
    """Base class of a task. Override what you need; every method may be sync or async.

    The runner (tasks/runner.py) calls a method and, when it returns an awaitable, awaits it;
    sync methods run in a worker thread, so blocking code does not stall the node, but a sync
    method must not touch trio objects. Every call has a deadline (the end of its window);
    an exception or a timeout is a failure of that call for that round only.

    - `setup()`: once, before the first round the node takes part in.
    - `task(round)`: the work of `round`, run during `round`.
    - `submission(round) -> str`: the proof for `round`'s work, sent in round+1's submission
      window; at most 512 bytes of UTF-8 (usually a cid of data kept in the store).
    - `audit(submission, round, submitter) -> bool`: False when `submitter`'s submission for
      `round` is invalid; the node votes against it. Never called on the node's own.
    - `distribution(submitters, bounty, round) -> {account: amount}`: the rewards of `round`
      among its accepted submitters; integer amounts summing to at most `bounty`. Every
      voter recomputes it and compares, so it must be deterministic in its arguments.
    """

    name: str = "task"

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    def setup(self) -> None | Awaitable[None]:
        return None

    def task(self, round: int) -> None | Awaitable[None]:
        return None

    def submission(self, round: int) -> str | Awaitable[str]:
        raise NotImplementedError

    def audit(self, submission: str, round: int, submitter: str) -> bool | Awaitable[bool]:
        raise NotImplementedError

    def distribution(
        self, submitters: list[str], bounty: int, round: int
    ) -> dict[str, int] | Awaitable[dict[str, int]]:
        return equal_shares(submitters, bounty)


def equal_shares(submitters: list[str], bounty: int) -> dict[str, int]:
    """`bounty // n` to each distinct submitter (sorted by account); the remainder stays unpaid."""
    accounts = sorted(set(submitters))
    if not accounts or bounty <= 0:
        return {}
    share = bounty // len(accounts)
    if share == 0:
        return {}
    return {account: share for account in accounts}


class CodeHashMismatch(RuntimeError):
    """The installed task code is not the code the task was created with."""


def code_hash(task_class: type) -> str:
    """sha256 (hex) of the source of the module that defines `task_class`."""
    module = sys.modules.get(task_class.__module__)
    if module is None:
        raise CodeHashMismatch(f"module {task_class.__module__!r} of {task_class!r} not loaded")
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError) as e:
        raise CodeHashMismatch(f"source of {task_class.__module__!r} unavailable: {e}") from e
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def check_code_hash(task_class: type, expected: str | bytes, task_id: str = "") -> None:
    """Raise CodeHashMismatch unless `task_class`'s code hashes to `expected`: hex, or the
    32 bytes the chain's task config holds (create_task's `code_hash` is
    `bytes.fromhex(code_hash(cls))`)."""
    if isinstance(expected, bytes):
        expected = expected.hex()
    actual = code_hash(task_class)
    if actual != expected:
        label = f"task {task_id!r}" if task_id else f"{task_class.__qualname__}"
        raise CodeHashMismatch(
            f"{label}: installed code {task_class.__module__} hashes to {actual}, "
            f"the chain records {expected}; refusing to run it (install the task's code "
            f"as created, or create a new task for the new code)"
        )
