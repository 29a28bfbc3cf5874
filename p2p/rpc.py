# Request/response over direct libp2p streams.
# Lives here: protocol ids `/tasknet/<network>/<name>/<version>`, framed streams with a size
# limit and timeouts, the server loop (per-peer concurrency limit, error replies, penalties)
# and the client (a small pool of idle streams per peer and protocol, reused for many calls).
# Must not live here: what the messages mean; that belongs to the services built on top.
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from .framing import HEADER_SIZE, FrameError, decode_body, encode_frame, frame_length

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]


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


class HandlerError(Exception):
    """Raise from a handler to send the caller a specific error code."""

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

    async def write_frame(self, message: Any) -> None:
        await self.stream.write(encode_frame(message, self.max_frame))

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:  # the stream may already be gone; nothing else to do
            log.debug("reset of a dead stream failed", exc_info=True)


@dataclass
class RpcLimits:
    max_frame: int = 4 * 1024 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_concurrent_per_peer: int = 16
    idle_streams_per_peer: int = 4


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
        self._peer_slots: dict[str, trio.Semaphore] = {}
        self._idle: dict[tuple[str, TProtocol], list[FramedStream]] = {}
        self.served = 0
        self.refused = 0

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
        try:
            while True:
                with trio.move_on_after(self.limits.idle_timeout) as idle:
                    try:
                        request = await framed.read_frame()
                    except EOFError:
                        return
                if idle.cancelled_caught:
                    return
                reply = await self._answer(peer, handler, request)
                await framed.write_frame(reply)
        except FrameError as exc:
            self.refused += 1
            log.warning("refused a frame from %s: %s", peer, exc)
            self._on_offence(peer, "frame")
            await framed.reset()
        except StreamError:
            log.debug("stream from %s ended abruptly", peer)
        finally:
            try:
                await stream.close()
            except Exception:
                log.debug("closing stream from %s failed", peer, exc_info=True)

    async def _answer(self, peer: str, handler: Handler, request: Any) -> Any:
        async with self._slots(peer):
            try:
                with trio.fail_after(self.limits.request_timeout):
                    result = await handler(peer, request)
                self.served += 1
                return {"ok": result}
            except HandlerError as exc:
                return {"error": {"code": exc.code, "message": str(exc)}}
            except trio.TooSlowError:
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
        pid = protocol_id(self.network, name, version)
        if self._is_blocked(peer_id):
            raise PeerUnreachable(f"{peer_id} is isolated from this node")
        limit = timeout if timeout is not None else self.limits.request_timeout
        key = (peer_id, pid)
        try:
            with trio.fail_after(limit):
                framed = await self._checkout(key)
                try:
                    await framed.write_frame(message)
                    reply = await framed.read_frame()
                except BaseException:
                    await framed.reset()
                    raise
        except trio.TooSlowError:
            raise RequestTimeout(f"{name} to {peer_id} timed out after {limit}s") from None
        except (EOFError, StreamError, FrameError) as exc:
            raise RequestError(f"{name} to {peer_id} failed: {exc}") from exc
        await self._checkin(key, framed)
        if not isinstance(reply, dict):
            raise RequestError(f"{name} to {peer_id}: malformed reply")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise RemoteError(str(err.get("code", "error")), str(err.get("message", "")))
        if "ok" not in reply:
            raise RequestError(f"{name} to {peer_id}: malformed reply")
        return reply["ok"]

    async def _checkout(self, key: tuple[str, TProtocol]) -> FramedStream:
        idle = self._idle.get(key)
        if idle:
            return idle.pop()
        peer_id, pid = key
        try:
            stream = await self.host.new_stream(ID.from_base58(peer_id), [pid])
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise PeerUnreachable(f"cannot open {pid} to {peer_id}: {exc}") from exc
        return FramedStream(stream, self.limits.max_frame)

    async def _checkin(self, key: tuple[str, TProtocol], framed: FramedStream) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.limits.idle_streams_per_peer:
            idle.append(framed)
            return
        try:
            await framed.stream.close()
        except StreamError:
            log.debug("closing a surplus stream failed", exc_info=True)

    def forget_peer(self, peer_id: str) -> None:
        for key in [k for k in self._idle if k[0] == peer_id]:
            del self._idle[key]
