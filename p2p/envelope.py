# Signed envelopes: the wire form of every message that claims an author.
# Lives here (sans-IO): sealing a payload with an Ed25519 signature, opening and checking one
# (size, protocol version, network, channel, signature) and the per-author replay guards:
# ReplayGuard for counted sequences (gossip), TimedReplayGuard for sequences that are
# microsecond wall times (requests that several tasks of one sender have in flight at once).
# Must not live here: sockets, clocks, libp2p objects. Callers pass in everything.
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .identity import Identity, verify_signature

PROTOCOL_VERSION = 1
REPLAY_WINDOW = 256
TIMED_REPLAY_WINDOW_US = 600_000_000  # 10 minutes either side of the receiver's clock


class EnvelopeError(ValueError):
    """An envelope was refused. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    author: bytes  # raw Ed25519 public key, 32 bytes
    seq: int
    network: str
    channel: str
    payload: Any


def seal(identity: Identity, network: str, channel: str, seq: int, payload: Any) -> bytes:
    """Encode `payload` into a signed envelope for `channel` of `network`."""
    body = msgpack.packb(
        [network, channel, identity.public_key, seq, payload], use_bin_type=True
    )
    return msgpack.packb([PROTOCOL_VERSION, body, identity.sign(body)], use_bin_type=True)


def open_envelope(
    data: bytes, *, network: str, channel: str, max_size: int
) -> Envelope:
    """Check and decode an envelope; raise EnvelopeError saying why it is refused."""
    if len(data) > max_size:
        raise EnvelopeError("oversized", f"{len(data)} bytes > limit {max_size}")
    try:
        outer = msgpack.unpackb(data, raw=False, max_bin_len=max_size, max_str_len=1024)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EnvelopeError(
            "malformed", f"not a msgpack envelope ({exc.__class__.__name__})"
        ) from None
    if not isinstance(outer, list) or len(outer) != 3:
        raise EnvelopeError("malformed", "envelope is not [version, body, signature]")
    version, body, signature = outer
    if version != PROTOCOL_VERSION:
        raise EnvelopeError("version", f"unknown protocol version {version!r}")
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise EnvelopeError("malformed", "body and signature must be bytes")
    if len(signature) != 64:
        raise EnvelopeError("unsigned", "missing or truncated signature")
    try:
        fields = msgpack.unpackb(body, raw=False, max_bin_len=max_size, max_str_len=max_size)
    except Exception as exc:
        raise EnvelopeError(
            "malformed", f"body is not msgpack ({exc.__class__.__name__})"
        ) from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise EnvelopeError("malformed", "body is not [network, channel, author, seq, payload]")
    env_network, env_channel, author, seq, payload = fields
    if not isinstance(author, bytes) or len(author) != 32:
        raise EnvelopeError("malformed", "author is not a 32-byte Ed25519 key")
    if not isinstance(seq, int) or seq < 0:
        raise EnvelopeError("malformed", "sequence is not a non-negative integer")
    if not verify_signature(author, body, signature):
        raise EnvelopeError("forged", "signature does not match author")
    if env_network != network:
        raise EnvelopeError("network", f"envelope for network {env_network!r}, not {network!r}")
    if env_channel != channel:
        raise EnvelopeError("channel", f"envelope for {env_channel!r}, not {channel!r}")
    return Envelope(author, seq, env_network, env_channel, payload)


@dataclass
class _AuthorWindow:
    highest: int = -1
    seen_bits: int = 0  # bit i set: sequence highest - i was seen


@dataclass
class ReplayGuard:
    """Accepts each (author, seq) once; sequences older than the window are refused."""

    window: int = REPLAY_WINDOW
    max_authors: int = 100_000
    _authors: dict[bytes, _AuthorWindow] = field(default_factory=dict)

    def check_and_record(self, author: bytes, seq: int) -> None:
        state = self._authors.get(author)
        if state is None:
            if len(self._authors) >= self.max_authors:
                self._authors.pop(next(iter(self._authors)))
            state = self._authors[author] = _AuthorWindow()
        if seq > state.highest:
            shift = seq - state.highest
            if shift >= self.window:
                state.seen_bits = 1
            else:
                state.seen_bits = ((state.seen_bits << shift) | 1) & ((1 << self.window) - 1)
            state.highest = seq
            return
        age = state.highest - seq
        if age >= self.window:
            raise EnvelopeError("replayed", f"sequence {seq} is older than the replay window")
        if state.seen_bits >> age & 1:
            raise EnvelopeError("replayed", f"sequence {seq} was already seen")
        state.seen_bits |= 1 << age

    def forget(self, author: bytes) -> None:
        self._authors.pop(author, None)


def next_timed_seq(last: int, now_us: int) -> int:
    """The sequence after `last` for a sender whose wall clock reads `now_us` (microseconds):
    unique and increasing, across restarts too, and close to the wall time (a
    TimedReplayGuard refuses sequences far from its own clock)."""
    return max(last + 1, now_us)


@dataclass
class _TimedWindow:
    floor: int = -1  # every sequence at or below it is refused
    heap: list[int] = field(default_factory=list)  # the sequences remembered, smallest first
    seen: set[int] = field(default_factory=set)


@dataclass
class TimedReplayGuard:
    """Accepts each (author, seq) once, for sequences that are the sender's wall time in
    microseconds (next_timed_seq). A sequence more than `window_us` before or after the
    receiver's clock is refused, so only the sequences of the last window are remembered;
    within it any order is accepted (requests of one sender in flight at once overtake each
    other). Memory is bounded: per author at most `per_author` sequences (past that the
    smallest is forgotten and everything up to it refused: an honest request overtaken by that
    many others of its sender is refused, and retried by its sender) and at most `max_authors`
    authors (the least recently heard forgotten first: it could then replay its own messages
    of the last window once). Nodes that sent counted sequences (small numbers) are refused."""

    window_us: int = TIMED_REPLAY_WINDOW_US
    per_author: int = 4096
    max_authors: int = 1024
    refused: int = 0
    _authors: OrderedDict[bytes, _TimedWindow] = field(default_factory=OrderedDict)

    def check_and_record(self, author: bytes, seq: int, now_us: int) -> None:
        try:
            self._check_and_record(author, seq, now_us)
        except EnvelopeError:
            self.refused += 1
            raise

    def _check_and_record(self, author: bytes, seq: int, now_us: int) -> None:
        oldest = now_us - self.window_us
        if seq < oldest:
            raise EnvelopeError("replayed", f"sequence {seq} is {(now_us - seq) // 10**6} s old, "
                                f"older than the replay window of {self.window_us // 10**6} s")
        if seq > now_us + self.window_us:
            raise EnvelopeError("replayed", f"sequence {seq} is {(seq - now_us) // 10**6} s "
                                "ahead of this node's clock, beyond the replay window")
        state = self._authors.get(author)
        if state is None:
            if len(self._authors) >= self.max_authors:
                self._authors.popitem(last=False)
            state = self._authors[author] = _TimedWindow()
        else:
            self._authors.move_to_end(author)
        while state.heap and state.heap[0] < oldest:  # the age bound refuses these now
            state.seen.discard(heapq.heappop(state.heap))
        if seq <= state.floor or seq in state.seen:
            raise EnvelopeError("replayed", f"sequence {seq} was already seen")
        heapq.heappush(state.heap, seq)
        state.seen.add(seq)
        if len(state.heap) > self.per_author:
            forgotten = heapq.heappop(state.heap)
            state.seen.discard(forgotten)
            state.floor = max(state.floor, forgotten)
