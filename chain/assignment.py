# Who does what in a task's round, computed the same way by the chain and by every node: the
# round clock (round and window of a slot), the audit seed, the auditor ring (each submission
# gets exactly k = min(max_auditors, n - 1) auditors, every auditor audits exactly k
# submissions, nobody audits itself) and the order of distributors. docs/task-rounds.md.
# Pure functions of their arguments: no state, no clock, no I/O. Each sorts once: O(n log n).
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Protocol

from .merkle import encode_account

SUBMISSION = "submission"
AUDIT = "audit"
IDLE = "idle"
ROUND_BYTES = 8


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


def audit_seed(task_id: str, r: int, submissions: Mapping[str, str]) -> bytes:
    """sha256(b"tasknet-audit" || len-prefixed task_id || r as 8 bytes big endian || for each
    submitter in account order: len-prefixed account || sha256(submission UTF-8))."""
    parts = [b"tasknet-audit", encode_task_id(task_id), r.to_bytes(ROUND_BYTES, "big")]
    for account in sorted(submissions):
        parts.append(encode_account(account))
        parts.append(hashlib.sha256(submissions[account].encode("utf-8")).digest())
    return hashlib.sha256(b"".join(parts)).digest()


def _ordered(seed: bytes, accounts: Iterable[str], tag: bytes) -> list[str]:
    keyed = [
        (hashlib.sha256(seed + tag + account.encode("utf-8")).digest(), account)
        for account in set(accounts)
    ]
    keyed.sort()
    return [account for _, account in keyed]


def auditor_order(seed: bytes, accounts: Iterable[str]) -> list[str]:
    """The submitters ordered by sha256(seed || account UTF-8), ties by account: the ring."""
    return _ordered(seed, accounts, b"")


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


def auditors_of(seed: bytes, accounts: Iterable[str], target: str, max_auditors: int) -> list[str]:
    """The auditors assigned to `target`'s submission ([] when it is not a submitter)."""
    order = auditor_order(seed, accounts)
    if target not in order:
        return []
    return ring_auditors(order, order.index(target), auditor_count(len(order), max_auditors))


def targets_of(seed: bytes, accounts: Iterable[str], auditor: str, max_auditors: int) -> list[str]:
    """The submissions `auditor` must audit ([] when it is not a submitter)."""
    order = auditor_order(seed, accounts)
    if auditor not in order:
        return []
    return ring_targets(order, order.index(auditor), auditor_count(len(order), max_auditors))


def audit_assignment(
    seed: bytes, accounts: Iterable[str], max_auditors: int
) -> dict[str, list[str]]:
    """Every submitter -> its auditors, the ring built once."""
    order = auditor_order(seed, accounts)
    k = auditor_count(len(order), max_auditors)
    return {target: ring_auditors(order, i, k) for i, target in enumerate(order)}


def distribution_order(seed: bytes, accepted_accounts: Iterable[str]) -> list[str]:
    """The accepted submitters ordered by sha256(seed || b"distribution" || account UTF-8)."""
    return _ordered(seed, accepted_accounts, b"distribution")


def distributor_of(seed: bytes, accepted_accounts: Iterable[str], attempt: int) -> str:
    """The distributor of attempt `attempt` (0-based); the order wraps. ValueError if nobody
    was accepted."""
    order = distribution_order(seed, accepted_accounts)
    if not order:
        raise ValueError("no accepted submitter can distribute")
    return order[attempt % len(order)]
