# Quorum counting of the write path, pure: no I/O, no clock, no trio.
# Lives here: the count of one write's replica outcomes until enough acked or every outcome
# is known (Acks), the sloppy vs strict rule for a replica that is down (a fallback node
# holding a hint for it counts for it, except at consistency ALL), and the group that tells
# the write path once every write of one batch has settled (AckGroup).
# Must not live here: sending, hints, deadlines (kv/writes.py expires a group that waits too
# long), what the levels mean in numbers (Consistency.needed, kv/config.py).
from __future__ import annotations

from collections.abc import Callable


class AckGroup:
    """The writes of one batch: `on_done()` is called once every write in it settled.
    `remaining` starts at 1 for whoever fills the group (see `filled`), so that acks that
    arrive while it is being filled cannot finish it before every write is in it."""

    __slots__ = ("remaining", "_on_done")

    def __init__(self, on_done: Callable[[], None]) -> None:
        self.remaining = 1
        self._on_done = on_done

    def one_settled(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self._on_done()

    def filled(self) -> None:
        """Every write of the batch is in the group."""
        self.one_settled()


class Acks:
    """Counts the replica outcomes of one write (called with True/False per replica) until
    `needed` succeeded or all `total` are known; then `settled`, and its group is told once.
    `primaries_only` (strict quorum, consistency ALL): a fallback node holding a hint for a
    replica that is down does not count for it; otherwise (sloppy quorum) it does."""

    __slots__ = ("needed", "total", "ok", "known", "settled", "group", "primaries_only")

    def __init__(self, needed: int, total: int, group: AckGroup,
                 primaries_only: bool = False) -> None:
        self.needed, self.total = needed, total
        self.primaries_only = primaries_only
        self.ok = self.known = 0
        self.group = group
        self.settled = needed <= 0 or total == 0
        if not self.settled:
            group.remaining += 1

    def __call__(self, ok: bool) -> None:
        self.known += 1
        self.ok += ok
        if not self.settled and (self.ok >= self.needed or self.known >= self.total):
            self.settled = True
            self.group.one_settled()

    @property
    def met(self) -> bool:
        return self.ok >= self.needed

    def via_fallback(self) -> Acks | None:
        """The outcome a hint sent to a fallback node for a down replica reports to: this
        count (sloppy quorum), or None once the replica was counted as failed (strict)."""
        if self.primaries_only:
            self(False)  # the hint still goes out; it just cannot confirm an ALL write
            return None
        return self
