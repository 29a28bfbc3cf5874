# Who does what in a task's round, computed the same way by every chain (the ledger, the EVM
# contract) and by every node: the round clock (round and window of a slot), the running audit
# seed, the keyed permutation that lays out the auditor ring (each submission gets exactly
# k = min(max_auditors, n - 1) auditors, every auditor audits exactly k submissions, nobody
# audits itself) and the order of distributors. docs/task-rounds.md, docs/evm-settlement.md.
# Pure functions of their arguments: no state, no clock, no I/O. A contract checks one
# assignment with two `prp` evaluations; a node lays out a whole round in O(n).
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from .merkle import encode_account

SUBMISSION = "submission"
AUDIT = "audit"
IDLE = "idle"
ROUND_BYTES = 8
T = TypeVar("T")


class RoundClock(Protocol):
    @property
    def start_slot(self) -> int: ...
    @property
    def round_time(self) -> int: ...
    @property
    def submission_window(self) -> int: ...
    @property
    def audit_window(self) -> int: ...


def round_of(cfg: RoundClock, slot: int) -> int | None:
    """The task round that `slot` falls in; None before the task starts."""
    if slot < cfg.start_slot:
        return None
    return (slot - cfg.start_slot) // cfg.round_time


def window_of(cfg: RoundClock, slot: int) -> tuple[int, str]:
    """(round, "submission" | "audit" | "idle"); before the start: (-1, "idle")."""
    if slot < cfg.start_slot:
        return -1, IDLE
    current, offset = divmod(slot - cfg.start_slot, cfg.round_time)
    if offset < cfg.submission_window:
        return current, SUBMISSION
    if offset < cfg.submission_window + cfg.audit_window:
        return current, AUDIT
    return current, IDLE


def round_start(cfg: RoundClock, r: int) -> int:
    """The first slot of round r."""
    return cfg.start_slot + r * cfg.round_time


def audit_end(cfg: RoundClock, r: int) -> int:
    """The first slot after round r's audit window."""
    return round_start(cfg, r) + cfg.submission_window + cfg.audit_window


def encode_task_id(task_id: str) -> bytes:
    return encode_account(task_id)  # same length-prefixed UTF-8 encoding


# --- seeds: a running hash over the round's submissions, in the order they were included ---


def task_seed(task_id: str) -> bytes:
    """sha256(b"tasknet-audit" || u32be(len(task_id)) || task_id UTF-8): fixed per task."""
    return hashlib.sha256(b"tasknet-audit" + encode_task_id(task_id)).digest()


def first_seed(task_id: str, r: int) -> bytes:
    """The seed of round r before any submission: sha256(task_seed || u64be(r))."""
    return hashlib.sha256(task_seed(task_id) + r.to_bytes(ROUND_BYTES, "big")).digest()


def next_seed(seed: bytes, submission: str) -> bytes:
    """The seed after one more submission: sha256(seed || sha256(submission UTF-8))."""
    return hashlib.sha256(seed + hashlib.sha256(submission.encode("utf-8")).digest()).digest()


def audit_seed(task_id: str, r: int, submissions: Iterable[str]) -> bytes:
    """The audit seed of round r after these submissions (their texts, in inclusion order)."""
    seed = first_seed(task_id, r)
    for submission in submissions:
        seed = next_seed(seed, submission)
    return seed


def distribution_seed(seed: bytes) -> bytes:
    return hashlib.sha256(seed + b"distribution").digest()


# --- a keyed permutation of [0, n): the same on every chain (a contract computes it in O(1)) ---

FEISTEL_ROUNDS = 4


def _feistel_bits(n: int) -> int:
    bits = 2
    while (1 << bits) < n:
        bits += 2
    return bits


def prp(key: bytes, n: int, i: int) -> int:
    """The position of index i among n under the permutation keyed by `key`: a 4-round Feistel
    network on the smallest even bit width covering n, cycle-walking until below n."""
    if not 0 <= i < n:
        raise ValueError(f"index {i} outside [0, {n})")
    if n == 1:
        return 0
    half = _feistel_bits(n) // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for t in range(FEISTEL_ROUNDS):
            digest = hashlib.sha256(key + bytes([t]) + right.to_bytes(4, "big")).digest()
            left, right = right, left ^ (int.from_bytes(digest, "big") & mask)
        x = (left << half) | right
        if x < n:
            return x


def permuted(key: bytes, items: Sequence[T]) -> list[T]:
    """`items` (in index order) laid out by position: out[prp(key, n, i)] = items[i]."""
    n = len(items)
    out: list[T | None] = [None] * n
    for i, item in enumerate(items):
        out[prp(key, n, i)] = item
    return out  # type: ignore[return-value]  # every position is filled: prp is a permutation


def auditor_order(seed: bytes, accounts: Sequence[str]) -> list[str]:
    """The ring: the submitters (given in inclusion order) by position prp(seed, n, index)."""
    return permuted(seed, accounts)


def auditor_count(n: int, max_auditors: int) -> int:
    """k: how many auditors each of n submissions gets (and how many targets each auditor)."""
    return max(0, min(max_auditors, n - 1))


def ring_auditors(order: list[str], position: int, k: int) -> list[str]:
    """The auditors of the submitter at `position` of the ring: the next k positions."""
    n = len(order)
    return [order[(position + step) % n] for step in range(1, k + 1)]


def ring_targets(order: list[str], position: int, k: int) -> list[str]:
    """Whom the submitter at `position` audits: the previous k positions."""
    n = len(order)
    return [order[(position - step) % n] for step in range(1, k + 1)]


def may_audit(seed: bytes, n: int, k: int, auditor_index: int, target_index: int) -> bool:
    """Whether the submitter with index `auditor_index` audits the one with `target_index`:
    1 <= (position(auditor) - position(target)) mod n <= k (what a contract checks)."""
    distance = (prp(seed, n, auditor_index) - prp(seed, n, target_index)) % n
    return 1 <= distance <= k


def auditors_of(seed: bytes, accounts: Sequence[str], target: str, max_auditors: int) -> list[str]:
    """The auditors assigned to `target`'s submission ([] when it is not a submitter)."""
    order = auditor_order(seed, accounts)
    if target not in order:
        return []
    return ring_auditors(order, order.index(target), auditor_count(len(order), max_auditors))


def targets_of(seed: bytes, accounts: Sequence[str], auditor: str, max_auditors: int) -> list[str]:
    """The submissions `auditor` must audit ([] when it is not a submitter)."""
    order = auditor_order(seed, accounts)
    if auditor not in order:
        return []
    return ring_targets(order, order.index(auditor), auditor_count(len(order), max_auditors))


def audit_assignment(
    seed: bytes, accounts: Sequence[str], max_auditors: int
) -> dict[str, list[str]]:
    """Every submitter -> its auditors, the ring built once."""
    order = auditor_order(seed, accounts)
    k = auditor_count(len(order), max_auditors)
    return {target: ring_auditors(order, i, k) for i, target in enumerate(order)}


def distribution_order(seed: bytes, accounts: Sequence[str]) -> list[str]:
    """Every submitter (given in inclusion order) by distribution position
    prp(distribution_seed(seed), n, index): attempt j is sent by the one at position j mod n."""
    return permuted(distribution_seed(seed), accounts)


def distributor_of(seed: bytes, accounts: Sequence[str], attempt: int) -> str:
    """The distributor of attempt `attempt` (0-based); the order wraps. ValueError if nobody
    submitted."""
    if not accounts:
        raise ValueError("nobody submitted: nobody can distribute")
    return distribution_order(seed, accounts)[attempt % len(accounts)]
