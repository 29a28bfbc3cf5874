# Request/response over direct libp2p streams.
# Lives here: protocol ids `/tasknet/<network>/<name>/<version>`, framed streams with a size
# limit and timeouts, the server loop (per-peer concurrency limit, error replies, penalties)
# and the client. Requests are multiplexed: frames are [request id, message] and one stream
# per (peer, protocol) carries many requests at once, since opening a stream costs several
# round trips in py-libp2p. The server answers each with [request id, reply]. Request ids are
# positive, but for NO_REPLY (-1): a one-way message (`notify`), handled like a request and
# never answered; any other negative id is a malformed frame. A client drops a reply for an
# id it does not wait for (a request it gave up on; an older server answering a NO_REPLY
# message). Must not live here: what the messages mean (the services do).
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from .framing import HEADER_SIZE, FrameError, decode_body, encode_frame, frame_length

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]

NO_REPLY = -1  # the request id of a one-way message: the server writes nothing back


class RequestError(Exception):
    """A request did not get a successful reply."""


class RemoteError(RequestError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestTimeout(RequestError):
    pass


class PeerUnreachable(RequestError):
    pass


# The code a handler answers a malformed request with (wrong shape, field types or ranges).
# The sender is scored down for it ("malformed"): an honest node sends only well-formed
# requests of the protocol version it asked for, so a request kind or field that a later
# release adds takes a new version of its protocol, never a new meaning under the old one.
BAD_REQUEST = "bad_request"


class HandlerError(Exception):
    """Raise from a handler to send the caller a specific error code (BAD_REQUEST: the
    request was malformed, and its sender is scored down)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def protocol_id(network: str, name: str, version: int) -> TProtocol:
    return TProtocol(f"/tasknet/{network}/{name}/{version}")


class FramedStream:
    """A libp2p stream carrying length-prefixed msgpack frames."""

    def __init__(self, stream: INetStream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._reset = False

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = await self.stream.read(max(65536, size - len(self._buffer)))
            if not chunk:
                raise FrameError("stream ended inside a frame")
            self._buffer += chunk

    async def read_frame(self) -> Any:
        """Next message; raises EOFError on a clean end between frames."""
        if not self._buffer:
            try:
                await self._fill(1)
            except (StreamError, FrameError) as exc:
                raise EOFError from exc
        await self._fill(HEADER_SIZE)
        length = frame_length(bytes(self._buffer[:HEADER_SIZE]), self.max_frame)
        await self._fill(HEADER_SIZE + length)
        body = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        return decode_body(body, self.max_frame)

    async def write_frame(self, message: Any, deadline: float) -> None:
        """Write one message whole. Yamux splits a large one into several frames (and waits
        for the peer's window between them); cancelled halfway, it would leave part of a
        frame on the stream and the peer could parse nothing after it (and would blame this
        node). So the write goes on through a cancellation of its caller until `deadline`
        (trio time), and a cancelled caller sees the cancellation once it is over. A write
        still unfinished at `deadline` resets the stream; then the caller sees its
        cancellation if it was cancelled, else StreamError."""
        data = encode_frame(message, self.max_frame)
        with trio.CancelScope(shield=True, deadline=deadline) as whole:
            await self.stream.write(data)
        if whole.cancelled_caught:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                await self.reset()
            await trio.lowlevel.checkpoint_if_cancelled()
            raise StreamError(f"a {len(data)}-byte write did not finish in time; stream reset")
        await trio.lowlevel.checkpoint_if_cancelled()

    async def reset(self) -> None:
        if self._reset:
            return
        self._reset = True
        try:
            await self.stream.reset()
        except Exception:  # the stream may already be gone; nothing else to do
            log.debug("reset of a dead stream failed", exc_info=True)


@dataclass
class RpcLimits:
    max_frame: int = 4 * 1024 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_concurrent_per_peer: int = 64


class _Channel:
    """The client end of one multiplexed stream: a reader task matches replies to callers."""

    def __init__(self, framed: FramedStream) -> None:
        self.framed = framed
        self.pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.next_id = 0
        self.write_lock = trio.Lock()
        self.broken: BaseException | None = None
        self.retired = False  # out of the table: reset once its last request is done
        self.notifying = 0  # one-way messages being written: a retired channel waits for them
        self.replies = 0  # reply frames read (whether a caller still waited for them or not)
        self.last_write = trio.current_time()  # when this end last wrote a frame

    def idle(self) -> bool:
        return not self.pending and not self.notifying

    async def read_replies(self) -> None:
        try:
            while True:
                frame = await self.framed.read_frame()
                if not (isinstance(frame, list) and len(frame) == 2 and isinstance(frame[0], int)):
                    raise FrameError("reply is not [request id, reply]")
                self.replies += 1
                waiter = self.pending.pop(frame[0], None)
                # None: the caller gave up (timeout) already, or the id is NO_REPLY's that a
                # server of an earlier release answers anyway: dropped, not an error
                if waiter is not None:
                    waiter[1].append(frame[1])
                    waiter[0].set()
        except (EOFError, FrameError, StreamError) as exc:
            self.broken = exc
        finally:
            if self.broken is None:
                self.broken = RequestError("stream closed")
            for event, _ in self.pending.values():
                event.set()
            self.pending.clear()


class RpcService:
    """Serves registered protocols and makes requests to peers."""

    def __init__(
        self,
        host: IHost,
        network: str,
        limits: RpcLimits,
        on_offence: Callable[[str, str], None],
        is_blocked: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.host = host
        self.network = network
        self.limits = limits
        self._on_offence = on_offence
        self._is_blocked = is_blocked
        # per peer while it has streams being served: its slots, and how many such streams
        self._peer_slots: dict[str, trio.Semaphore] = {}
        self._peer_streams: dict[str, int] = {}
        self._channels: dict[tuple[str, TProtocol], _Channel] = {}
        self._opening: dict[tuple[str, TProtocol], trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.served = 0  # requests and one-way messages whose handler succeeded
        self.answered = 0  # reply frames written
        self.notified = 0  # one-way messages received (answered with nothing)
        self.refused = 0
        self.streams_renewed = 0  # client streams left for a new one after half idle_timeout

    def attach(self, nursery: trio.Nursery) -> None:
        """The nursery that owns the stream tasks (the Network's)."""
        self._nursery = nursery

    # -- server side ---------------------------------------------------------------------
    def handle(self, name: str, handler: Handler, version: int = 1) -> TProtocol:
        pid = protocol_id(self.network, name, version)

        async def on_stream(stream: INetStream) -> None:
            await self._serve_stream(stream, handler)

        self.host.set_stream_handler(pid, on_stream)
        return pid

    def _slots(self, peer: str) -> trio.Semaphore:
        slots = self._peer_slots.get(peer)
        if slots is None:
            slots = self._peer_slots[peer] = trio.Semaphore(self.limits.max_concurrent_per_peer)
        return slots

    async def _serve_stream(self, stream: INetStream, handler: Handler) -> None:
        peer = str(stream.muxed_conn.peer_id)
        framed = FramedStream(stream, self.limits.max_frame)
        if self._is_blocked(peer):
            await framed.reset()
            return
        write_lock = trio.Lock()
        slots = self._slots(peer)
        self._peer_streams[peer] = self._peer_streams.get(peer, 0) + 1

        async def answer(request_id: int, request: Any) -> None:
            try:
                reply = await self._answer(peer, handler, request)
                if request_id == NO_REPLY:  # a one-way message: its outcome stays here
                    self.notified += 1
                    return
                async with write_lock:
                    await framed.write_frame([request_id, reply],
                                             trio.current_time() + self.limits.request_timeout)
                self.answered += 1
            except (StreamError, FrameError) as exc:
                log.debug("reply to %s failed: %s", peer, exc)
            finally:
                slots.release()

        try:
            async with trio.open_nursery() as requests:
                await self._read_requests(peer, framed, slots, requests, answer)
        finally:
            self._stream_done(peer)
            try:
                await stream.close()
            except Exception:
                log.debug("closing stream from %s failed", peer, exc_info=True)

    def _stream_done(self, peer: str) -> None:
        """One stream of `peer` is no longer served; with its last one its slots go (every
        request of it is over): a peer met once, or a fresh identity per connection, would
        otherwise leave an entry here for the life of the process."""
        left = self._peer_streams[peer] - 1
        if left:
            self._peer_streams[peer] = left
        else:
            del self._peer_streams[peer]
            self._peer_slots.pop(peer, None)

    async def _read_requests(self, peer: str, framed: FramedStream, slots: trio.Semaphore,
                             requests: trio.Nursery, answer: Callable[[int, Any], Any]) -> None:
        try:
            while True:
                with trio.move_on_after(self.limits.idle_timeout) as idle:
                    try:
                        frame = await framed.read_frame()
                    except EOFError:
                        return
                if idle.cancelled_caught:
                    return
                if not (isinstance(frame, list) and len(frame) == 2
                        and isinstance(frame[0], int)):
                    raise FrameError("request is not [request id, message]")
                if frame[0] < 0 and frame[0] != NO_REPLY:
                    raise FrameError(f"negative request id {frame[0]}")
                await slots.acquire()  # stop reading while the peer has too many in flight
                requests.start_soon(answer, frame[0], frame[1])
        except FrameError as exc:
            self.refused += 1
            log.warning("refused a frame from %s: %s", peer, exc)
            self._on_offence(peer, "frame")
            await framed.reset()
            requests.cancel_scope.cancel()
        except StreamError:
            log.debug("stream from %s ended abruptly", peer)

    async def _answer(self, peer: str, handler: Handler, request: Any) -> Any:
        try:
            with trio.fail_after(self.limits.request_timeout):
                result = await handler(peer, request)
            self.served += 1
            return {"ok": result}
        except HandlerError as exc:
            if exc.code == BAD_REQUEST:
                self.refused += 1
                log.info("refused a malformed request from %s: %s", peer, exc)
                self._on_offence(peer, "malformed")
            else:
                log.debug("handler refused a request from %s: %s", peer, exc)
            return {"error": {"code": exc.code, "message": str(exc)}}
        except trio.TooSlowError:
            log.debug("handler timed out on a request from %s", peer)
            return {"error": {"code": "timeout", "message": "handler timed out"}}
        except Exception as exc:
            log.exception("handler failed for a request from %s", peer)
            return {"error": {"code": "internal", "message": exc.__class__.__name__}}

    # -- client side ---------------------------------------------------------------------
    async def request(
        self,
        peer_id: str,
        name: str,
        message: Any,
        *,
        version: int = 1,
        timeout: float | None = None,
    ) -> Any:
        key, limit = self._target(peer_id, name, version, timeout)
        channel: _Channel | None = None
        request_id = 0
        box: list[Any] = []
        with trio.move_on_after(limit) as deadline:
            channel = await self._channel(key)
            channel.next_id += 1
            request_id = channel.next_id
            event = trio.Event()
            channel.pending[request_id] = (event, box)
            try:
                await self._write(key, channel, [request_id, message], deadline.deadline, name)
                await event.wait()
            finally:  # answered, failed, timed out or cancelled: nothing waits for it now
                channel.pending.pop(request_id, None)
                self._close_if_retired(channel)
        if deadline.cancelled_caught:
            self._timed_out(key, channel, name, limit)
        assert channel is not None
        if not box:
            self._drop(key, channel)
            raise RequestError(f"{name} to {peer_id} failed: {channel.broken}")
        reply = box[0]
        if not isinstance(reply, dict):
            raise RequestError(f"{name} to {peer_id}: malformed reply")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise RemoteError(str(err.get("code", "error")), str(err.get("message", "")))
        if "ok" not in reply:
            raise RequestError(f"{name} to {peer_id}: malformed reply")
        return reply["ok"]

    async def notify(
        self,
        peer_id: str,
        name: str,
        message: Any,
        *,
        version: int = 1,
        timeout: float | None = None,
    ) -> None:
        """Send `message` one way, on the stream requests to `peer_id` use: one frame with
        NO_REPLY for its id. Returns once the frame is written; the peer's handler runs but
        nothing comes back, so a lost or failed message is not seen here. A peer that cannot
        be reached, or a write that fails or does not finish in `timeout`, raises as in
        `request`."""
        key, limit = self._target(peer_id, name, version, timeout)
        channel: _Channel | None = None
        with trio.move_on_after(limit) as deadline:
            channel = await self._channel(key)
            channel.notifying += 1
            try:
                await self._write(key, channel, [NO_REPLY, message], deadline.deadline, name)
            finally:
                channel.notifying -= 1
                self._close_if_retired(channel)
        if deadline.cancelled_caught:
            self._timed_out(key, channel, name, limit)

    async def _write(self, key: tuple[str, TProtocol], channel: _Channel, frame: list[Any],
                     deadline: float, name: str) -> None:
        """Write one frame on the channel; a stream that fails it is dropped (RequestError)."""
        try:
            async with channel.write_lock:
                await channel.framed.write_frame(frame, deadline)
                channel.last_write = trio.current_time()
        except (StreamError, FrameError) as exc:
            self._drop(key, channel)
            raise RequestError(f"{name} to {key[0]} failed: {exc}") from exc

    def _timed_out(self, key: tuple[str, TProtocol], channel: _Channel | None, name: str,
                   limit: float) -> NoReturn:
        """A request or message past its time limit. Its stream may sit on a dead connection
        (a peer that restarted): a fresh one is opened next time rather than waited on."""
        if channel is not None:
            self._drop(key, channel)
        raise RequestTimeout(f"{name} to {key[0]} timed out after {limit}s")

    def _close_if_retired(self, channel: _Channel) -> None:
        if channel.retired and channel.idle():
            self._close(channel)

    def _target(self, peer_id: str, name: str, version: int,
                timeout: float | None) -> tuple[tuple[str, TProtocol], float]:
        """The channel key of a request or message to `peer_id` and its time limit;
        PeerUnreachable when the peer is banned or isolated."""
        if self._is_blocked(peer_id):
            raise PeerUnreachable(f"{peer_id} is banned by or isolated from this node")
        limit = timeout if timeout is not None else self.limits.request_timeout
        return (peer_id, protocol_id(self.network, name, version)), limit

    async def _channel(self, key: tuple[str, TProtocol]) -> _Channel:
        while True:
            channel = self._channels.get(key)
            if channel is not None and channel.broken is None:
                if not (channel.idle() and trio.current_time() - channel.last_write
                        >= self.limits.idle_timeout / 2):
                    return channel
                # the server closes a stream it has read nothing from for idle_timeout: one
                # written to just then would lose the frame (a one-way message, silently).
                # Half that idle, this end starts a new stream instead.
                self.streams_renewed += 1
                self._drop(key, channel)
                continue
            opening = self._opening.get(key)
            if opening is None:
                break
            await opening.wait()  # someone else is opening it: share theirs
        self._opening[key] = opening = trio.Event()
        try:
            peer_id, pid = key
            try:
                stream = await self.host.new_stream(ID.from_base58(peer_id), [pid])
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise PeerUnreachable(f"cannot open {pid} to {peer_id}: {exc}") from exc
            channel = _Channel(FramedStream(stream, self.limits.max_frame))
            assert self._nursery is not None, "RpcService.attach() was not called"
            self._nursery.start_soon(channel.read_replies)
            self._channels[key] = channel
            return channel
        finally:
            del self._opening[key]
            opening.set()

    def _drop(self, key: tuple[str, TProtocol], channel: _Channel) -> None:
        if self._channels.get(key) is channel:
            del self._channels[key]
        self._close(channel)

    def _close(self, channel: _Channel) -> None:
        """Reset the channel's stream (its reader then ends), in this service's nursery."""
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(channel.framed.reset)
        except RuntimeError:  # the service is stopping: its nursery tears the streams down
            pass

    def retire_peer(self, peer_id: str) -> None:
        """Open new streams to `peer_id` for the next requests (on the connection the swarm
        picks now), leaving the requests under way on the old ones to finish: each old stream
        is reset once its last request is done (at once when none is)."""
        for key in [k for k in self._channels if k[0] == peer_id]:
            channel = self._channels.pop(key)
            channel.retired = True
            self._close_if_retired(channel)

    def forget_peer(self, peer_id: str) -> None:
        for key in [k for k in self._channels if k[0] == peer_id]:
            self._drop(key, self._channels[key])
