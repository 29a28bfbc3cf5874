# The time bound on replicated state: no state from a peer may carry a wall time further
# ahead of this node's clock than `max_clock_skew_s` (KVConfig). Such states are refused,
# counted, logged and their sender scored down, never stored; an operator's override write
# replaces a stored state that is beyond the bound (data stored before the bound existed).
# Lives here: the check itself, the "replace if beyond the bound" update the group commit runs,
# the kv-apply reply that names refused items, and a rate-limited log of refusals.
# Must not live here: the handlers that call it (kv/writes.py, kv/reads.py, kv/repair.py),
# what latest_wall reads (crdt/).
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import crdt

from .hints import wall_ms

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # at most one info line per this many seconds; the rest at debug


class TimeBound:
    """The bound of one node: `limit(now)` is the latest wall time a state may carry."""

    def __init__(self, max_skew_ms: int) -> None:
        self.max_skew_ms = max_skew_ms
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    def beyond(self, state: bytes, now_ms: int) -> bool:
        """True if `state` carries a wall time past the bound (crdt.DecodeError or TypeError
        if it is not an encoded state)."""
        return crdt.latest_wall(state) > now_ms + self.max_skew_ms

    def beyond_or_false(self, state: bytes, now_ms: int) -> bool:
        """`beyond`, with a malformed state taken as within the bound: for callers whose
        merge reports malformed states on its own."""
        try:
            return self.beyond(state, now_ms)
        except (crdt.DecodeError, TypeError):
            return False

    def stale_check(self) -> Callable[[bytes], bool]:
        """A test for a stored state, run at write time: is it beyond the bound now?"""
        return lambda state: self.beyond_or_false(state, wall_ms())

    def report(self, count: int, what: str, peer: str) -> None:
        """Log refused states: one info line per LOG_EVERY_S, with what was not logged."""
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.info("refused %d state(s) %s %s: wall time more than %d ms ahead of this "
                     "node's clock%s", count, what, peer, self.max_skew_ms,
                     f" ({self._unlogged} more refused since the last line)"
                     if self._unlogged else "")
            self._logged_at, self._unlogged = now, 0
        else:
            self._unlogged += count
            log.debug("refused %d state(s) %s %s beyond the clock skew bound", count, what, peer)


# -- the kv-apply reply ---------------------------------------------------------------------
# All applied: the number of items (what older nodes always answer). Some refused:
# {"n": items, "refused": [index, ...]} (indices in the batch, ascending).

def apply_reply(items: int, refused: list[int]) -> Any:
    return items if not refused else {"n": items, "refused": refused}


def refused_indices(reply: Any, items: int) -> set[int]:
    """The items of a batch of `items` that a kv-apply reply says were refused; anything but
    the refusal form (an int from an older node included) means all were applied."""
    if not isinstance(reply, dict):
        return set()
    refused = reply.get("refused")
    if not isinstance(refused, list):
        return set()
    return {i for i in refused if type(i) is int and 0 <= i < items}
