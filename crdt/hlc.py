# Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014), sans-IO.
# Physical time is always an argument (integer milliseconds); nothing here reads a clock.
from __future__ import annotations

from typing import NamedTuple

from .errors import ClockDriftError

MAX_UINT64 = 2**64 - 1
DEFAULT_MAX_DRIFT_MS = 60_000


class Timestamp(NamedTuple):
    """An HLC reading: `wall` milliseconds plus a `logical` counter; ordered as a tuple."""

    wall: int
    logical: int


ZERO = Timestamp(0, 0)


def check_timestamp(ts: object) -> Timestamp:
    """Return `ts` as a Timestamp if both parts are ints in 0..2**64-1, else raise ValueError."""
    if not isinstance(ts, tuple) or len(ts) != 2:
        raise ValueError(f"timestamp must be a Timestamp(wall, logical), got {ts!r}")
    wall, logical = ts
    for name, part in (("wall", wall), ("logical", logical)):
        if type(part) is not int or not 0 <= part <= MAX_UINT64:
            raise ValueError(f"timestamp {name} must be an int in 0..2**64-1, got {part!r}")
    return ts if type(ts) is Timestamp else Timestamp(wall, logical)


class HLC:
    """A hybrid logical clock for one node.

    `now(physical_ms)` stamps a local event; `observe(remote, physical_ms)` folds in a
    timestamp received from another node. Readings never go backwards, even when the
    physical time passed in does. A remote timestamp more than `max_drift_ms` ahead of
    the local physical time is refused with ClockDriftError and leaves the clock as it was,
    so one node with a runaway clock cannot drag every other clock (and every last-writer-
    wins register) into the future.
    """

    __slots__ = ("_last", "max_drift_ms")

    def __init__(self, last: Timestamp = ZERO, *,
                 max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> None:
        if type(max_drift_ms) is not int or max_drift_ms < 0:
            raise ValueError(f"max_drift_ms must be a non-negative int, got {max_drift_ms!r}")
        self._last = check_timestamp(last)
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> Timestamp:
        """The most recent reading handed out."""
        return self._last

    def now(self, physical_ms: int) -> Timestamp:
        """Timestamp for a local event (or a message about to be sent)."""
        _check_physical(physical_ms)
        last = self._last
        if physical_ms > last.wall:
            ts = Timestamp(physical_ms, 0)
        else:
            ts = Timestamp(last.wall, last.logical + 1)
        self._last = ts
        return ts

    def observe(self, remote: Timestamp, physical_ms: int) -> Timestamp:
        """Merge a remote timestamp; returns the new local reading (greater than both)."""
        _check_physical(physical_ms)
        remote = check_timestamp(remote)
        ahead = remote.wall - physical_ms
        if ahead > self.max_drift_ms:
            raise ClockDriftError(
                f"remote timestamp is {ahead} ms ahead of local physical time "
                f"(max drift {self.max_drift_ms} ms)")
        last = self._last
        wall = max(last.wall, remote.wall, physical_ms)
        if wall == last.wall and wall == remote.wall:
            logical = max(last.logical, remote.logical) + 1
        elif wall == last.wall:
            logical = last.logical + 1
        elif wall == remote.wall:
            logical = remote.logical + 1
        else:
            logical = 0
        self._last = Timestamp(wall, logical)
        return self._last


def _check_physical(physical_ms: int) -> None:
    if type(physical_ms) is not int or not 0 <= physical_ms <= MAX_UINT64:
        raise ValueError(f"physical time must be an int of milliseconds >= 0, got {physical_ms!r}")
