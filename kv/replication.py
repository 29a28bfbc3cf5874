# Outgoing replication: per-peer queues of deltas, sent in signed batches over direct streams.
# Lives here: batching with backpressure (a bounded queue per peer), one Ed25519 signature
# per batch, and the outcome callbacks (acked / failed) that quorum counting listens to; the
# batch envelope (sealing, and opening with the replay guard: every batch a node sends has a
# sequence from next_timed_seq, the receiver takes each (sender, seq) once and none older or
# newer than TIMED_REPLAY_WINDOW_US from its clock: batches of releases before the guard, whose
# sequences were counters, are refused); the size arithmetic that keeps any batch within a
# frame, and dropping the one item that alone cannot fit one.
# Must not live here: choosing targets (the coordinator) or storing anything.
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2p import ConfigError, Network, RequestError
from p2p.envelope import Envelope, EnvelopeError, TimedReplayGuard, open_envelope, seal
from p2p.identity import peer_id_from_public_key

from .timebound import refused_indices

log = logging.getLogger(__name__)

APPLY_PROTOCOL = "kv-apply"
BATCH_CHANNEL = "kv.batch"

Outcome = Callable[[bool], None]

# a batch item's encoding beyond its key and delta: [key, delta, hint_for], hint_for a peer id
ITEM_OVERHEAD_BYTES = 128
# a sealed batch beyond its items: the signed envelope (network id aside) and the request
# frame around it
ENVELOPE_OVERHEAD_BYTES = 512


def check_frame_room(max_batch_bytes: int, max_items: int, network_id: str,
                     max_frame_size: int) -> None:
    """ConfigError unless a batch of `max_items` items whose keys and deltas add up to
    `max_batch_bytes` fits in a frame once sealed (the write path keeps every key and delta
    within `max_batch_bytes`, so every write then replicates)."""
    needed = (max_batch_bytes + max_items * ITEM_OVERHEAD_BYTES + ENVELOPE_OVERHEAD_BYTES
              + len(network_id.encode()))
    if needed > max_frame_size:
        raise ConfigError(f"kv max_batch_bytes ({max_batch_bytes}) with {max_items} items "
                          f"needs frames of {needed} bytes once sealed; max_frame_size is "
                          f"{max_frame_size}")


def fits_frame(net: Network, sealed: bytes) -> bool:
    """Whether a sealed batch can be sent in one request frame (the request id and headers
    around it take less than 32 bytes)."""
    return len(sealed) + 32 <= net.config.max_frame_size


@dataclass
class Delta:
    key: bytes
    delta: bytes
    hint_for: str | None
    on_outcome: Outcome | None
    override: bool = False  # replace the replica's state if it is beyond the skew bound

    def to_wire(self) -> list[Any]:
        """A kv-apply item: [key, delta, hint_for], plus True for an override."""
        if self.override:
            return [self.key, self.delta, self.hint_for, True]
        return [self.key, self.delta, self.hint_for]


def seal_batch(net: Network, items: list[list[Any]], seq: int) -> bytes:
    return seal(net.identity, net.config.network_id, BATCH_CHANNEL, seq, items)


def open_batch(net: Network, data: Any, sender: str, guard: TimedReplayGuard,
               now_us: int) -> Envelope:
    """Verify a batch: signed by `sender` (the Noise-authenticated peer) for this network, and
    not seen before (`guard`, at wall time `now_us`): EnvelopeError "replayed" if it was."""
    if not isinstance(data, bytes):
        raise EnvelopeError("malformed", "batch is not bytes")
    envelope = open_envelope(data, network=net.config.network_id, channel=BATCH_CHANNEL,
                             max_size=net.config.max_frame_size)
    if str(peer_id_from_public_key(envelope.author)) != sender:
        raise EnvelopeError("author", "batch signed by another peer than the sender")
    if not isinstance(envelope.payload, list):
        raise EnvelopeError("malformed", "batch payload is not a list")
    guard.check_and_record(envelope.author, envelope.seq, now_us)
    return envelope


class PeerLink:
    """The outgoing queue to one peer and the task that drains it in batches.

    The queue is a plain deque, not a trio channel: every replicated delta passes through it
    (twice per write with three replicas), and a channel's per-item bookkeeping cost more
    than the rest of queueing. Backpressure: at `queue` items, push_nowait refuses and push
    waits until the drainer has taken a batch."""

    def __init__(self, net: Network, peer: str, max_batch: int, max_bytes: int, queue: int,
                 on_failed: Callable[[str, list[Delta]], None],
                 next_seq: Callable[[], int]) -> None:
        self.net = net
        self.peer = peer
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.capacity = queue
        self._queue: deque[Delta] = deque()
        self._items_wanted: trio.Event | None = None  # set by a push: the drainer waits
        self._room_wanted: trio.Event | None = None  # set by the drainer: a pusher waits
        self._on_failed = on_failed
        self._next_seq = next_seq  # the node's batch sequences (shared by all its senders)
        self.sent = 0  # deltas acknowledged
        self.batches = 0  # batches acknowledged
        self.failed_batches = 0
        self.oversized = 0  # items dropped because alone they do not fit in a frame
        self._closing = False  # see close()
        self._ended = False  # the drainer returned after close(): items go to on_failed

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def push(self, item: Delta) -> None:
        """Queue one delta; waits while the queue is full (backpressure)."""
        while len(self._queue) >= self.capacity:
            if self._room_wanted is None:
                self._room_wanted = trio.Event()
            await self._room_wanted.wait()
        self._append(item)
        await trio.lowlevel.checkpoint()

    def push_nowait(self, item: Delta) -> bool:
        if len(self._queue) >= self.capacity:
            return False
        self._append(item)
        return True

    def _append(self, item: Delta) -> None:
        if self._ended:  # retired (its peer left the ring) while a writer held it
            self._on_failed(self.peer, [item])
            return
        self._queue.append(item)
        if self._items_wanted is not None:
            self._items_wanted.set()
            self._items_wanted = None

    def close(self) -> None:
        """The peer left the ring: the drainer sends what is queued, then ends."""
        self._closing = True
        if self._items_wanted is not None:
            self._items_wanted.set()
            self._items_wanted = None

    async def run(self) -> None:
        queue = self._queue
        while True:
            while not queue:
                if self._closing:
                    self._ended = True
                    return
                self._items_wanted = trio.Event()
                await self._items_wanted.wait()
            first = queue.popleft()
            batch, size = [first], len(first.key) + len(first.delta)
            while queue and len(batch) < self.max_batch:
                item = queue[0]
                size += len(item.key) + len(item.delta)
                if size > self.max_bytes:
                    break
                batch.append(queue.popleft())
            if self._room_wanted is not None:
                self._room_wanted.set()
                self._room_wanted = None
            await self._send_batch(batch)

    async def _send_batch(self, batch: list[Delta]) -> None:
        items = [d.to_wire() for d in batch]
        sealed = seal_batch(self.net, items, self._next_seq())
        if not fits_frame(self.net, sealed):
            if len(batch) > 1:  # cannot happen with a checked config; never send it whole
                half = len(batch) // 2
                await self._send_batch(batch[:half])
                await self._send_batch(batch[half:])
                return
            self._drop_oversized(batch[0], len(sealed))
            return
        try:
            reply = await self.net.request(self.peer, APPLY_PROTOCOL, sealed)
        except RequestError as exc:
            self.failed_batches += 1
            log.info("replication batch of %d to %s failed: %s", len(batch), self.peer, exc)
            self._on_failed(self.peer, batch)
            return
        # items the peer refused (beyond its clock skew bound) are not replica writes: they
        # fail their write and are dropped (a hint would be refused again)
        refused = refused_indices(reply, len(batch))
        if refused:
            log.info("%s refused %d of %d deltas (beyond its clock skew bound); dropped",
                     self.peer, len(refused), len(batch))
        self.sent += len(batch) - len(refused)
        self.batches += 1
        for index, item in enumerate(batch):
            if item.on_outcome is not None:
                item.on_outcome(index not in refused)

    def _drop_oversized(self, item: Delta, size: int) -> None:
        """A state too large for any frame (grown by merges past what one write may make):
        it could never be delivered, and retrying or hinting it would block what follows.
        Anti-entropy and reads are what is left to bring it (and fail as visibly)."""
        self.oversized += 1
        log.warning("dropped a replication item for %s (key %r): %d bytes sealed do not fit "
                    "in a %d-byte frame", self.peer, item.key[:64], size,
                    self.net.config.max_frame_size)
        if item.on_outcome is not None:
            item.on_outcome(False)
