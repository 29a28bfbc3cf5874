# Workarounds for defects of the pinned py-libp2p (see pyproject.toml), applied to the whole
# process when a Network starts. Each says what breaks without it and how it was seen.
# Must not live here: tasknet logic, or any setting a user should choose.
from __future__ import annotations

import logging
import os
import socket

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream, _yamux_release_on_read
from libp2p.transport.tcp import tcp as libp2p_tcp
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

# Once its frame is encrypted, a write finishes before a cancellation or deadline of its
# caller takes effect, for up to this long after that deadline (a healthy peer takes a frame
# at once; one that takes none for this long is stalled) and never longer than
# FRAME_WRITE_LIMIT_S in all. A frame cut short cannot be completed later, so a write that
# runs out of time closes the connection.
FRAME_WRITE_GRACE_S = 2.0
FRAME_WRITE_LIMIT_S = 10.0
LISTENER_CLOSE_S = 2.0  # how long closing one libp2p listener may take (it is quick)


def tune_yamux() -> None:
    """py-libp2p's Yamux by default credits the sender with every read's bytes (a window
    update, and so a frame with its Noise encryption and send, per frame received). This
    turns that off; `credit_windows_at_half` closes the other path to the same cost. py-libp2p
    reads the setting from the environment on each read, so it holds for every host of the
    process; a user's setting wins."""
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


_window_update_of_libp2p = YamuxStream._auto_tune_and_send_window_update


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Yamux's receive-window bookkeeping after a read, crediting the sender once half the
    window is consumed (go-yamux's rule, and py-libp2p's own intent), or at once when the
    sender is nearly out of credit.

    py-libp2p 0.8.1 has a further branch ("partial slack") that credits the sender whenever
    the window is below its target by less than half, which is after nearly every read: a
    window-update frame (a Noise encryption, a send, a read and a decryption at the peer)
    for every request or reply received. Counted in a 3-node run of 6,000 single writes: 1,339
    of 3,612 frames were such updates. It also over-credits (the read's bytes twice), so a
    peer that stopped reading still took in several windows. Here such a read only adds to
    the pending credit while the sender still has half a window of credit; once it has
    less (a slow reader: py-libp2p's writer gives up after 5 s without credit), each read
    credits what was consumed, exactly. Everything else (growing the window, auto-tuning)
    is py-libp2p's own code. Nothing awaits between the check and the bookkeeping, so no
    other task sees them apart."""
    buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
    delta = self.target_recv_window - (self.recv_window + buffered)
    threshold = self._grow_threshold()
    if bytes_read <= 0 or not 0 < delta < threshold:
        await _window_update_of_libp2p(self, bytes_read=bytes_read)
        return
    pending = self._pending_recv_release + bytes_read
    if pending < threshold and self.recv_window >= threshold:
        self._pending_recv_release = pending
        return
    # half a window read since the last credit, or the sender nearly out of credit: credit
    # what was consumed (the window's shortfall from its target), no more
    self._pending_recv_release = 0
    self.recv_window += delta
    await self.send_window_update(delta, skip_lock=True)


def credit_windows_at_half() -> None:
    """Install `_window_update_at_half` on py-libp2p's Yamux streams, or keep py-libp2p's
    own when the user asked for its credit on every read (PY_YAMUX_RELEASE_ON_READ=1, read
    once here rather than on every read); idempotent."""
    YamuxStream._auto_tune_and_send_window_update = (  # type: ignore[method-assign]
        _window_update_of_libp2p if _yamux_release_on_read() else _window_update_at_half)


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


READ_AHEAD_BYTES = 65536  # what one receive from a TCP socket may take beyond the ask

_tcp_read_of_libp2p = TrioTCPStream.read


async def _read_ahead(self: TrioTCPStream, n: int | None = None) -> bytes:
    """A TCP connection's read that takes what the socket holds (up to READ_AHEAD_BYTES) and
    keeps what the caller did not ask for, for its next reads.

    py-libp2p reads a Noise message as two exact reads, its 2-byte length and then its body,
    each a socket receive (a system call, a lock and trio's socket wrapper). Under load many
    messages wait in the socket at once; with this they cost one receive between them.
    Bytes come out in the order they came in: the kept bytes are served first, and a receive
    happens only when none are kept (checked under a lock of its own, so two readers cannot
    receive past each other). Errors and end of stream are py-libp2p's own."""
    if n == 0:
        return b""
    if n is not None and n < 0:
        n = None  # what the socket holds, as for None
    kept: bytearray | None = getattr(self, "_tasknet_kept", None)
    if kept is None:
        kept = bytearray()
        self._tasknet_kept = kept  # type: ignore[attr-defined]
        self._tasknet_receive_lock = trio.Lock()  # type: ignore[attr-defined]
    if not kept:
        lock: trio.Lock = self._tasknet_receive_lock  # type: ignore[attr-defined]
        async with lock:
            if not kept:
                data = await _tcp_read_of_libp2p(self, max(n or 0, READ_AHEAD_BYTES))
                if n is None or len(data) <= n:
                    return data
                kept += memoryview(data)[n:]
                return data[:n]
    if n is None or n >= len(kept):
        data = bytes(kept)
        kept.clear()
        return data
    data = bytes(kept[:n])
    del kept[:n]
    return data


def read_tcp_ahead() -> None:
    """Install `_read_ahead` on py-libp2p's TCP connections (idempotent)."""
    TrioTCPStream.read = _read_ahead  # type: ignore[method-assign]


def make_frame_writes_cancel_safe() -> None:
    """Install `_write_frame_whole` on py-libp2p's Yamux (once; idempotent)."""
    Yamux._write_frame = _write_frame_whole  # type: ignore[method-assign]


def _reuse_address_only(sock: trio.socket.SocketType) -> None:
    """SO_REUSEADDR without py-libp2p's SO_REUSEPORT (see `refuse_taken_listen_ports`)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        pass


def refuse_taken_listen_ports() -> None:
    """py-libp2p sets SO_REUSEPORT on its TCP listeners (for NAT hole punching, which tasknet
    does not use), so a second node asked to listen on a port another node already listens on
    binds it too and starts; the kernel then splits incoming connections between the two.
    Seen as: two `node.py --listen /ip4/127.0.0.1/tcp/4001` both running. Without
    SO_REUSEPORT the second bind fails with "address in use" and the node refuses to start;
    SO_REUSEADDR stays, so a restarted node still rebinds a port its last run left in
    TIME_WAIT. A hole-punch dial, which would bind the listen port, falls back to an
    ephemeral source port (py-libp2p's own fallback)."""
    libp2p_tcp._set_reuse_flags = _reuse_address_only


_listen_of_libp2p = libp2p_tcp.TCPListener.listen


async def _listen_or_close(self: libp2p_tcp.TCPListener, maddr: Multiaddr) -> None:
    """py-libp2p's listen, closing the listener when it fails."""
    try:
        await _listen_of_libp2p(self, maddr)
    except BaseException:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + LISTENER_CLOSE_S):
            await self.close()
        raise


def close_failed_listeners() -> None:
    """py-libp2p's swarm creates one listener per address and forgets it, unclosed, when its
    listen fails (say, "address in use"): the listener's accepting task, a trio system task,
    then sleeps for the rest of the process. Seen as: a task left per failed start in a
    process that retries. Now a listen that fails closes its listener first."""
    libp2p_tcp.TCPListener.listen = _listen_or_close  # type: ignore[method-assign]


def apply_all() -> None:
    refuse_taken_listen_ports()
    close_failed_listeners()
    tune_yamux()
    credit_windows_at_half()
    read_tcp_ahead()
    make_frame_writes_cancel_safe()
