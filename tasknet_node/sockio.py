# Sending and receiving on non-blocking sockets under trio, waiting only when the socket has
# nothing to give or no room to take: trio's socket streams yield to the scheduler after every
# send and every receive, which costs a request-per-message server (and a load generator) a
# large share of its CPU.
# Lives here: those two calls, and closing such a socket.
# Must not live here: any protocol (http.py speaks HTTP over them).
from __future__ import annotations

import socket

import trio


async def receive_some(sock: socket.socket, max_bytes: int) -> bytes:
    """Up to `max_bytes` from `sock` (b"" once the peer closed); OSError if it failed."""
    while True:
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock.fileno())


async def send_all(sock: socket.socket, data: bytes) -> None:
    """All of `data` to `sock`; OSError if it failed."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock.fileno())


def close(sock: socket.socket) -> None:
    """Close a socket this module's calls may be waiting on (they wake with an error)."""
    trio.lowlevel.notify_closing(sock.fileno())
    sock.close()
