# When a register tombstone may be collected (sans-IO policy; the sweep that acts on it is in
# kv/sweeper.py).
# Lives here: whether a stored state is a collectable tombstone at a given time, and whether the
# answers of a key's replicas allow removing it, call for a repair first, or forbid both.
# Must not live here: clocks (now is an argument), storage, networking, the sweep's pacing.
#
# A tombstone (an LWW register whose winning write is a delete) exists so that an older write
# still held somewhere cannot win again. It may go once no copy of an older write can reach a
# replica any more: the delete is older than the grace period (hints expire sooner, so no hint
# older than it is still delivered), and every replica of the key holds exactly this tombstone
# or nothing. A replica holding an older state is repaired first (sent the tombstone) and the
# key is looked at again later; a replica holding anything else (a newer write, another type, an
# unreadable state) or not answering keeps the tombstone where it is.
from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import StrEnum

import crdt

# Every encoded tombstone starts with the same bytes (the register's fixed-length array and
# type tag) and ends with the same bytes (deleted = true, then the packed None): a cheap test
# that spares decoding almost every other state a sweep reads.
_SAMPLE = crdt.encode(crdt.LWWRegister().delete(crdt.Timestamp(1, 0), "x"))
_TOMBSTONE_HEAD, _TOMBSTONE_TAIL = _SAMPLE[:2], _SAMPLE[-4:]


class Verdict(StrEnum):
    COLLECT = "collect"  # every replica has this tombstone or nothing: remove it everywhere
    REPAIR = "repair"  # some replica holds an older write: send it the tombstone first
    KEEP = "keep"  # a replica did not answer, or holds something newer or different


def deleted_at(state: bytes) -> int | None:
    """Wall milliseconds of the delete when `state` is a register tombstone, else None."""
    if not (state.endswith(_TOMBSTONE_TAIL) and state.startswith(_TOMBSTONE_HEAD)):
        return None
    try:
        decoded = crdt.decode(state)
    except crdt.DecodeError:
        return None
    if not isinstance(decoded, crdt.LWWRegister) or not decoded.deleted:
        return None
    stamp = decoded.timestamp
    return None if stamp is None else stamp.wall


def is_candidate(state: bytes, now_ms: int, grace_ms: int) -> bool:
    """True when `state` is a tombstone whose delete is more than `grace_ms` before `now_ms`."""
    wall = deleted_at(state)
    return wall is not None and now_ms - wall > grace_ms


def decide(tombstone: bytes, replicas: Collection[str],
           answers: Mapping[str, bytes | None]) -> Verdict:
    """What to do with `tombstone` given what each of the key's `replicas` holds
    (`answers[peer]`: its state, None when it holds nothing; a peer absent did not answer)."""
    if not replicas:
        return Verdict.KEEP
    stale = False
    for peer in replicas:
        if peer not in answers:
            return Verdict.KEEP
        state = answers[peer]
        if state is None or state == tombstone:
            continue
        if not _dominates(tombstone, state):
            return Verdict.KEEP
        stale = True
    return Verdict.REPAIR if stale else Verdict.COLLECT


def _dominates(tombstone: bytes, state: bytes) -> bool:
    """True when merging `state` into `tombstone` leaves the tombstone: `state` is older."""
    try:
        return crdt.merge_encoded(tombstone, state) == tombstone
    except (crdt.DecodeError, TypeError, ValueError):
        return False
