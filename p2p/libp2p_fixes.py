# Workarounds for defects of the pinned py-libp2p (see pyproject.toml), applied to the whole
# process when a Network starts. Each says what breaks without it and how it was seen.
# Must not live here: tasknet logic, or any setting a user should choose.
from __future__ import annotations

import logging
import os

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)

# Once its frame is encrypted, a write finishes before a cancellation or deadline of its
# caller takes effect, for up to this long after that deadline (a healthy peer takes a frame
# at once; one that takes none for this long is stalled) and never longer than
# FRAME_WRITE_LIMIT_S in all. A frame cut short cannot be completed later, so a write that
# runs out of time closes the connection.
FRAME_WRITE_GRACE_S = 2.0
FRAME_WRITE_LIMIT_S = 10.0


def tune_yamux() -> None:
    """py-libp2p's Yamux answers every read with a window update by default, a frame (and a
    Noise encryption and a send) per frame received; go-yamux's rule, an update once half the
    window is consumed, halves the frames of request/response traffic. py-libp2p reads the
    setting from the environment on each read, so it holds for every host of the process;
    a user's setting wins."""
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


async def _write_frame_whole(self: Yamux, data: bytes) -> None:
    """Yamux's frame write with the Noise encryption and the send made one step.

    Noise numbers its messages: encrypting one takes the next nonce, and the receiver can
    decrypt only in that order. py-libp2p encrypts and then waits for the TCP stream's lock,
    a point where a cancelled task stops, so a request cancelled at the wrong moment (a
    timeout, or a quorum read that no longer needs a slow replica) spends a nonce without
    sending its message. Every later frame on the connection then fails the receiver's
    check ("Failed authentication of message") and the connection dies under every stream
    and the gossip of both peers. Seen in the KV system tests as reads failing between
    live nodes. Waiting for the frame lock stays cancellable: nothing is encrypted yet.
    Bounded by FRAME_WRITE_GRACE_S past the caller's deadline (or its cancellation) and by
    FRAME_WRITE_LIMIT_S in all."""
    async with self._write_lock:
        now = trio.current_time()
        allowed = max(trio.current_effective_deadline(), now) + FRAME_WRITE_GRACE_S
        with trio.CancelScope(shield=True,
                              deadline=min(allowed, now + FRAME_WRITE_LIMIT_S)) as scope:
            await self.secured_conn.write(data)
        if scope.cancelled_caught:
            log.info("a frame write did not finish in time; closing the connection")
            self.event_shutting_down.set()  # the reader then ends quietly on the close
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                await self.secured_conn.close()
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sees that
            raise ConnectionClosedError("a frame write did not finish in time; connection "
                                        "closed", transport="tcp")
    await trio.lowlevel.checkpoint()


def make_frame_writes_cancel_safe() -> None:
    """Install `_write_frame_whole` on py-libp2p's Yamux (once; idempotent)."""
    Yamux._write_frame = _write_frame_whole  # type: ignore[method-assign]


def apply_all() -> None:
    tune_yamux()
    make_frame_writes_cancel_safe()
