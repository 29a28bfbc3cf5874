# Workarounds for defects of the pinned py-libp2p (see pyproject.toml), applied to the whole
# process when a Network starts. Each says what breaks without it and how it was seen.
# Must not live here: tasknet logic, or any setting a user should choose.
from __future__ import annotations

import errno
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream, _yamux_release_on_read
from libp2p.tools.anyio_service.trio_manager import TrioManager
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


def _newest_connection(self: Swarm, connections: list[INetConn]) -> INetConn:
    """The connection a new stream to a peer goes on: the newest one (a direct one before a
    relayed one, as py-libp2p has it).

    py-libp2p 0.8.1 takes the one carrying the most streams, which is the oldest: a peer that
    crashed or froze without closing its connections (a machine gone, a process stopped
    whose sockets stayed open), then started again and dialed us, left us with its old,
    silent connection holding all our streams and its new one holding its own. Every stream
    we opened to it went into the old one and stalled until its request timed out, over and
    over: the restarted member's membership sync never got an answer, and it stayed out of
    everyone's view until the old connection was given up on (10 s and more). A peer with
    two live connections (both sides dialed at once) is served by either."""

    def rank(item: tuple[int, INetConn]) -> tuple[bool, float, int]:
        index, conn = item
        try:
            direct = conn.get_connection_type() == ConnectionType.DIRECT
        except Exception:
            direct = True
        return direct, float(getattr(conn, "_created_at", 0.0)), index

    return max(enumerate(connections), key=rank)[1]


def use_newest_connections() -> None:
    """Install `_newest_connection` on py-libp2p's Swarm (idempotent)."""
    Swarm._best_connection = _newest_connection  # type: ignore[method-assign]


_new_stream_of_libp2p = Swarm.new_stream


async def _new_stream_past_closing(self: Swarm, peer_id: ID) -> INetStream:
    """py-libp2p's new stream to `peer_id`, after dialing it anew when every connection the
    swarm lists for it is closed (py-libp2p dials only for a peer it lists no connection
    of, and refuses a stream to one whose connections all closed but are still listed:
    "No valid connections available"). Seen right after a member restarted: its peers close
    their connections to its old run (p2p/network.py, `_emit`), which takes py-libp2p
    ~0.2 s, and every request in that time failed."""
    conns = self.get_connections(peer_id)
    if conns and all(conn.is_closed for conn in conns):
        await self.dial_peer(peer_id)  # py-libp2p's own dial: it skips closed connections
    return await _new_stream_of_libp2p(self, peer_id)


def dial_past_closing_connections() -> None:
    """Install `_new_stream_past_closing` on py-libp2p's Swarm (idempotent)."""
    Swarm.new_stream = _new_stream_past_closing  # type: ignore[method-assign]


def forget_dial_failures(host: object, peer: str) -> None:
    """Let the next stream to `peer` dial it, even if every address of it failed within the
    last minute. py-libp2p's swarm then refuses every dial to the peer for 60 s ("recently
    failed all addresses"), including the one a new stream needs: requests to a member that
    restarted (dialed in vain while it was down) failed for up to a minute after it was
    back. Tasknet keeps its own backoff per peer (p2p/network.py) and its membership says
    when a peer is back."""
    network = getattr(host, "get_network", lambda: None)()
    cache = getattr(network, "_negative_peer_cache", None)
    if cache is not None:
        cache.evict(peer)


# -- no remote crash ---------------------------------------------------------------------
# A peer's behaviour can make a py-libp2p background task raise (a race in its own state, or
# a bug a message triggers). py-libp2p's service manager then cancels the whole service: the
# pubsub service, or the swarm and with it the host and the node. Seen: bans of peers that
# sent bad gossip ended the node with a KeyError (see `_teardown_banned_peer`). The fixes
# below keep such an error inside the one task or stream it happened in: it is logged, counted
# and reported to the node that owns the service, which scores the peer down.

FaultSink = Callable[[str | None, str, BaseException], None]
"""Told of each contained error: (peer id or None, where, error)."""

_fault_sinks: weakref.WeakKeyDictionary[object, FaultSink] = weakref.WeakKeyDictionary()
_door_gates: weakref.WeakKeyDictionary[object, Callable[[str], bool]] = \
    weakref.WeakKeyDictionary()
_contained = 0
DAEMON_RESTARTS_PER_MINUTE = 10  # a daemon task failing more often than this ends its service


def contained_errors() -> int:
    """How many errors the fixes below have kept from ending a py-libp2p service."""
    return _contained


def report_faults_to(owner: object, sink: FaultSink) -> None:
    """Send the errors contained in `owner` (a py-libp2p service or host) to `sink`."""
    _fault_sinks[owner] = sink


def refuse_at_the_door(host: object, is_refused: Callable[[str], bool]) -> None:
    """Reset every inbound stream (any protocol) of `host` from a peer `is_refused` names."""
    _door_gates[host] = is_refused


def _peer_of(fn: Any, args: tuple[Any, ...]) -> str | None:
    for arg in args:
        if isinstance(arg, ID):
            return str(arg)
    owner = getattr(fn, "__self__", None)
    for holder in (owner, getattr(owner, "muxed_conn", None)):
        peer = getattr(holder, "peer_id", None)
        if isinstance(peer, ID):
            return str(peer)
    return None


def _errors_only(exc: BaseException) -> BaseException | None:
    """`exc` if it is an error (or a group of only errors), None if it holds a cancellation
    or another BaseException (those must go on up)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        if all(isinstance(e, Exception) for e in leaves):
            return leaves[0] if len(leaves) == 1 else exc
        return None
    return exc if isinstance(exc, Exception) else None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _expected_shutdown(error: BaseException) -> bool:
    from libp2p.utils.connection_shutdown import is_expected_connection_shutdown
    return bool(is_expected_connection_shutdown(error))


def _contain(owner: object, where: str, peer: str | None, error: BaseException,
             stopping: bool = False) -> None:
    global _contained
    _contained += 1
    if isinstance(error, OSError) and error.errno == errno.EBADF:
        stopping = True  # a socket this node closed (its listeners go first when it stops)
    if stopping:  # sockets closing under a service on its way down: expected, not a fault
        log.debug("error in py-libp2p's %s while stopping: %r", where, error)
        return
    log.warning("contained an error in py-libp2p's %s (peer %s): %r", where, peer, error,
                exc_info=error)
    sink = _fault_sinks.get(owner)
    if sink is not None:
        try:
            sink(peer, where, error)
        except Exception:
            log.exception("a fault sink failed")


_run_task_of_libp2p = TrioManager.run_task


def _run_task_contained(self: TrioManager, async_fn: Callable[..., Awaitable[Any]],
                        *args: Any, daemon: bool = False, name: str | None = None,
                        _internal: bool = False) -> Any:
    """py-libp2p's run_task with the task's errors contained: a task ends alone with its
    error logged, and a daemon task (a service's loop) is restarted, at most
    DAEMON_RESTARTS_PER_MINUTE times a minute. A task scheduled on a service that is stopping
    is dropped (py-libp2p raised "Nursery is closed" into the peer's stream handler)."""
    service = self._service
    where = f"{type(service).__name__}.{getattr(async_fn, '__name__', 'task')}"
    peer = _peer_of(async_fn, args)

    async def contained(*inner: Any) -> None:
        restarts: list[float] = []
        while True:
            try:
                await async_fn(*inner)
                return
            except BaseException as exc:
                error = _errors_only(exc)
                if error is None or _expected_shutdown(error):
                    raise  # a cancellation, or py-libp2p's own: a connection going away
                _contain(service, where, peer, error,
                         stopping=self.is_cancelled or not self.is_running)
                if not daemon:
                    return
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60.0] + [now]
                if len(restarts) > DAEMON_RESTARTS_PER_MINUTE:
                    raise
            await trio.sleep(0.1)

    contained.__name__ = getattr(async_fn, "__name__", "task")
    if not self.is_running or self._task_nursery is None:
        log.debug("dropped %s: its service is not running", where)
        return None
    try:
        return _run_task_of_libp2p(self, contained, *args, daemon=daemon, name=name,
                                   _internal=_internal)
    except RuntimeError as exc:  # the service's nursery closed as it stops
        log.debug("dropped %s: %s", where, exc)
        return None


def contain_task_errors() -> None:
    """Install `_run_task_contained` on py-libp2p's service manager (idempotent)."""
    TrioManager.run_task = _run_task_contained  # type: ignore[method-assign]


_stream_handler_of_libp2p = BasicHost._swarm_stream_handler


async def _stream_handler_guarded(self: BasicHost, net_stream: INetStream) -> None:
    """py-libp2p's inbound stream handling (protocol negotiation, then the protocol's
    handler), refusing streams of a refused peer before negotiation and containing any error
    of a handler: it used to travel up through the connection's nursery into the swarm's
    task and end the host."""
    peer = str(net_stream.muxed_conn.peer_id)
    gate = _door_gates.get(self)
    if gate is not None and gate(peer):
        await _reset_quietly(net_stream)
        return
    try:
        await _stream_handler_of_libp2p(self, net_stream)
    except BaseException as exc:
        error = _errors_only(exc)
        if error is None:
            raise  # a cancellation: the connection or the node is stopping
        _contain(self, f"stream handler ({net_stream.get_protocol()})", peer, error)
        await _reset_quietly(net_stream)


async def _reset_quietly(stream: INetStream) -> None:
    """Reset `stream`, shielded and within a second; one already gone is fine."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
        try:
            await stream.reset()
        except Exception:
            pass


def contain_stream_handler_errors() -> None:
    """Install `_stream_handler_guarded` on py-libp2p's hosts (idempotent). Hosts that were
    already built keep the handler they registered with their swarm."""
    BasicHost._swarm_stream_handler = _stream_handler_guarded  # type: ignore[method-assign]


async def _teardown_banned_peer(self: Pubsub, peer_id: ID) -> None:
    """py-libp2p's teardown of a peer it has just blacklisted, without its race.

    py-libp2p resets the peer's stream and then runs `del self.peers[peer_id]`; while the
    reset awaits, the dead-peer handler (woken by that very reset, or by the disconnect a
    ban starts) may already have removed the peer: KeyError, and the pubsub service, the host
    and the node ended. Seen after 4 of about 10 gossip-triggered bans. Here the entry is
    removed only if it is still the one this teardown reset, with the cleanup py-libp2p's
    dead-peer handler does (queue closed, router told), so nothing of the peer stays behind
    whichever runs first."""
    stream = self.peers.get(peer_id)
    if stream is not None:
        try:
            await stream.reset()
        except Exception:
            pass
        if self.peers.get(peer_id) is stream:
            del self.peers[peer_id]
            queue = self.peer_queues.pop(peer_id, None)
            if queue is not None:
                queue.close()
            self.router.remove_peer(peer_id)
    self._forget_all_subscriptions(peer_id)


def teardown_banned_peers_safely() -> None:
    """Install `_teardown_banned_peer` on py-libp2p's Pubsub (idempotent)."""
    Pubsub._teardown_if_connected = _teardown_banned_peer  # type: ignore[method-assign]


_pubsub_stream_handler_of_libp2p = Pubsub.stream_handler


def registered_stream_is_live(pubsub: Pubsub, peer_id: ID) -> bool:
    """Whether the stream pubsub writes to `peer_id` on still sits on an open connection."""
    stream = pubsub.peers.get(peer_id)
    muxed = getattr(stream, "muxed_conn", None)
    return stream is not None and not getattr(muxed, "is_closed", False)


async def _pubsub_stream_handler_reannouncing(self: Pubsub, stream: INetStream) -> None:
    """py-libp2p's reading of a peer's pubsub stream, after telling the peer our
    subscriptions again when the stream is not its first.

    A peer announces its subscriptions once, on the stream it opens after connecting. When
    one side's stream to the other dies while the peer stays connected (a reconnect racing
    the old connection's close, or a stream rebuilt on purpose) py-libp2p forgets the peer's
    subscriptions and opens a new stream to it, but the peer, whose own stream is fine, never
    announces again: the first side then never counts it as a listener of any topic and
    publishes nothing to it. Seen on a testnet after a partition healed: peers judged the
    healed node silent and reconnected every few seconds for over a minute. A new stream
    from a peer we already write to is that case, so our subscriptions go out again (an
    announcement the peer holds already changes nothing there). And when the stream we
    write on sits on a connection that has closed (a fresh connection arrived before the old
    one's close was handled, so py-libp2p kept the old stream), it is replaced by one on the
    open connection, which carries our subscriptions."""
    peer_id = stream.muxed_conn.peer_id
    queue = self.peer_queues.get(peer_id)
    if peer_id in self.peers and not registered_stream_is_live(self, peer_id):
        self._handle_dead_peer(peer_id)  # reopens a stream (with our hello) while connected
    elif queue is not None and not queue.closed:
        queue.push(self.get_hello_packet())
    await _pubsub_stream_handler_of_libp2p(self, stream)


_handle_new_peer_of_libp2p = Pubsub._handle_new_peer


async def _handle_new_peer_replacing_stale(self: Pubsub, peer_id: ID) -> None:
    """py-libp2p's opening of a pubsub stream to a peer that connected, which it skips when
    it holds a stream for the peer already, even one on a connection that has closed since
    (the new connection's notice can come before the old one's close is handled, and that
    handler then keeps the peer because it is connected). Such a stream is dropped here, and
    py-libp2p opens one on the open connection."""
    if peer_id in self.peers and not registered_stream_is_live(self, peer_id):
        self._handle_dead_peer(peer_id)  # schedules the new stream while connected
        return
    await _handle_new_peer_of_libp2p(self, peer_id)


def reannounce_on_new_pubsub_streams() -> None:
    """Install `_pubsub_stream_handler_reannouncing` and `_handle_new_peer_replacing_stale`
    on py-libp2p's Pubsub (idempotent); a Pubsub registers its stream handler when it is
    built, so this goes first."""
    Pubsub.stream_handler = _pubsub_stream_handler_reannouncing  # type: ignore[method-assign]
    Pubsub._handle_new_peer = _handle_new_peer_replacing_stale  # type: ignore[method-assign]


def apply_all() -> None:
    reannounce_on_new_pubsub_streams()
    contain_task_errors()
    contain_stream_handler_errors()
    teardown_banned_peers_safely()
    refuse_taken_listen_ports()
    close_failed_listeners()
    tune_yamux()
    credit_windows_at_half()
    read_tcp_ahead()
    make_frame_writes_cancel_safe()
    use_newest_connections()
    dial_past_closing_connections()
