# A minimal HTTP/1.1 keep-alive client for load generation: one connection (a non-blocking
# socket driven directly), one request at a time, Content-Length bodies only. It costs the
# load generator a small fraction of the CPU a general client spends per request, so the
# nodes, not the driver, are what a throughput figure measures (the driver shares the
# machine's cores with them).
# Lives here: that client. Must not live here: anything the benchmarks measure.
from __future__ import annotations

import errno
import json
import os
import socket
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import trio

from tasknet_node.sockio import close, receive_some, send_all


class RawHttpError(Exception):
    """The request could not be sent or its answer read (the connection is closed)."""


class RawResponse:
    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RawHttpClient:
    """Requests to one base URL ("http://host:port") over one kept-alive connection."""

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._host_header = f"{self.host}:{self.port}".encode()
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    async def __aenter__(self) -> RawHttpClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            close(sock)
        await trio.lowlevel.checkpoint()

    async def get(self, path: str) -> RawResponse:
        return await self.request("GET", path)

    async def put(self, path: str, json: Any = None) -> RawResponse:
        return await self.request("PUT", path, json)

    async def post(self, path: str, json: Any = None) -> RawResponse:
        return await self.request("POST", path, json)

    async def request(self, method: str, path: str, body: Any = None) -> RawResponse:
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode(),
                                                      self._host_header)
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(data)
        else:
            data = b""
        try:
            with trio.fail_after(self.timeout):
                if self._sock is None:
                    self._sock = await _connect(self.host, self.port)
                    self._buffer.clear()
                await send_all(self._sock, head + b"\r\n" + data)
                return await self._read_response()
        except (OSError, trio.TooSlowError, ValueError, IndexError) as exc:
            await self.aclose()
            raise RawHttpError(f"{method} {path}: {exc!r}") from None

    async def _receive(self) -> None:
        assert self._sock is not None
        chunk = await receive_some(self._sock, 65536)
        if not chunk:
            raise ConnectionResetError("connection closed by the server")
        self._buffer += chunk

    async def _read_response(self) -> RawResponse:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._receive()
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[:end + 4]
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
        while len(self._buffer) < length:
            await self._receive()
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        if close:
            await self.aclose()
        return RawResponse(status, body)


async def _connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (driven directly: trio's socket streams yield to
    the scheduler after every send and receive, which a load generator pays for)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        await trio.lowlevel.wait_writable(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
    except BaseException:
        close(sock)
        raise
    return sock
