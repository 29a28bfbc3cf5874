# Errors of the crdt package. Only exception classes live here: no logic.
from __future__ import annotations


class DecodeError(ValueError):
    """Bytes are not a valid encoded CRDT state; the message says what is wrong with them."""


class ClockDriftError(ValueError):
    """A remote hybrid-logical-clock timestamp is further ahead of local time than allowed."""
