# A small HTTP/1.1 server for the node's local control API, on non-blocking sockets under trio.
# Lives here: the connection loop over the sans-IO request parser (http_parser.py: request
# line, headers, Content-Length and chunked bodies, the head and body limits), Expect:
# 100-continue, keep-alive and pipelining, timeouts against clients that stall, the bound on
# connections, routing by path pattern and method, the Host check against DNS rebinding, and
# the Request/Response types endpoints use.
# Must not live here: any endpoint (api.py and the extensions register them), socket binding,
# or byte-level parsing (http_parser.py).
#
# Why not an ASGI stack: a control API request costs well under a tenth of the CPU here that
# it costs through a general ASGI server and framework, and single-key writes are as cheap
# as this path is.
from __future__ import annotations

import errno
import json
import logging
import math
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import trio

from .http_parser import (
    DEFAULT_MAX_BODY,
    EndOfMessage,
    Event,
    Head,
    HttpError,
    Refused,
    RequestParser,
)
from .sockio import close, receive_some, send_all

__all__ = ["HttpApp", "HttpError", "JSONResponse", "Request", "Response", "Route",
           "error_response", "serve_http"]

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0  # a request head (or a keep-alive connection's next one) must arrive
BODY_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 30.0  # a client that stops reading its answer loses the connection
ACCEPT_RETRY_S = 0.1
TIMEOUT_CHECK_S = 1.0  # how late past its deadline a stalled connection may be cut
TIMEOUT_ANSWER_S = 5.0  # for the 408 to a client that stalled inside a request
RECEIVE_BYTES = 65536
REQUESTS_BETWEEN_YIELDS = 16
MAX_CONNECTIONS = 512  # past it, the connection idle the longest is closed
# accept() errors that say the system is out of a resource: wait, then accept again (as
# trio's serve_listeners does); and the errors of one connection that failed before it
# could be accepted (as trio's SocketListener ignores)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_CONNECTION_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name))
MAX_JSON_DEPTH = 100  # arrays and objects nested in a JSON body; deeper is refused
_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::(path|str))?}")
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass
class Request:
    method: str
    path: str  # percent-decoded
    query_params: dict[str, str]
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    _body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)

    async def body(self) -> bytes:
        return self._body

    async def stream(self) -> AsyncIterator[bytes]:
        yield self._body

    async def json(self) -> Any:
        """The body as JSON; ValueError if it is not, or nests deeper than MAX_JSON_DEPTH."""
        return parse_json(self._body)

    @property
    def media_type(self) -> str:
        """The Content-Type without its parameters, in lower case (media types are
        case-insensitive): "" if none was sent."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(data: bytes, **options: Any) -> Any:
    """`data` as JSON (`options` go to json.loads); ValueError if it is not, or if its arrays
    and objects nest deeper than MAX_JSON_DEPTH (deep enough, json.loads would run out of
    stack)."""
    try:
        value = json.loads(data, **options)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and nests_deeper(value):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def nests_deeper(value: Any) -> bool:
    """Whether arrays and objects in `value` nest more than MAX_JSON_DEPTH levels (walked
    without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return False


class Response:
    media_type = "text/plain; charset=utf-8"

    def __init__(self, content: bytes | str = b"", status_code: int = 200,
                 media_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.body = content.encode() if isinstance(content, str) else content
        self.status_code = status_code
        if media_type is not None:
            self.media_type = media_type
        self.headers = headers or {}


class JSONResponse(Response):
    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        body = json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()
        super().__init__(body, status_code, headers=headers)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The control API's error answer: {"error": code, "message": text}."""
    return JSONResponse({"error": code, "message": message}, status_code=status)


Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class Route:
    pattern: str
    endpoint: Endpoint
    methods: frozenset[str]
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        parts, last = [], 0
        for match in _PARAM.finditer(self.pattern):
            parts.append(re.escape(self.pattern[last:match.start()]))
            name, kind = match.group(1), match.group(2) or "str"
            parts.append(f"(?P<{name}>.*)" if kind == "path" else f"(?P<{name}>[^/]+)")
            last = match.end()
        parts.append(re.escape(self.pattern[last:]))
        self.regex = re.compile("".join(parts), re.DOTALL)  # used with fullmatch


class HttpApp:
    """Routes requests to endpoints: the first route whose pattern matches the path and
    whose methods include the request's (HEAD is served as GET without the body)."""

    def __init__(self, routes: Sequence[Route], trusted_hosts: Sequence[str] = ("*",),
                 max_body: int = DEFAULT_MAX_BODY, head_timeout: float = HEAD_TIMEOUT_S,
                 body_timeout: float = BODY_TIMEOUT_S) -> None:
        self.routes = list(routes)
        self.trusted_hosts = None if "*" in trusted_hosts else frozenset(trusted_hosts)
        self.max_body = max_body
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout

    def resolve(self, request: Request) -> Endpoint | Response:
        """The endpoint for a request (its path parameters set), or the error answer: a
        Host that is not trusted, no such path, or a method the path does not serve. Runs
        before the body is read, so a refused request costs no body buffering."""
        if self.trusted_hosts is not None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.trusted_hosts:
                return Response("Invalid host header", 400)
        method = "GET" if request.method == "HEAD" else request.method
        allowed: set[str] = set()
        for route in self.routes:
            match = route.regex.fullmatch(request.path)
            if match is None:
                continue
            if method not in route.methods:
                allowed |= route.methods
                continue
            request.path_params = match.groupdict()
            return route.endpoint
        if allowed:
            return Response("Method Not Allowed", 405,
                            headers={"allow": ", ".join(sorted(allowed))})
        return Response("Not Found", 404)


async def serve_http(app: HttpApp, sock: socket.socket,
                     *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on the bound, listening `sock` (which this takes over and closes) until
    cancelled; every connection lives in this call's nursery. At MAX_CONNECTIONS, a new
    connection closes the one idle the longest (idle: waiting for its next request's head),
    so idle keep-alive connections cannot lock clients out; when none is
    idle, accepting waits until a connection ends. A failed accept is retried after a pause
    when the system is out of file descriptors or memory, at once when only that one
    connection failed; any other error (the socket is broken) ends the call."""
    sock.setblocking(False)
    server = _Server(app)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.watch_deadlines)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(sock.fileno())
                if len(server.connections) >= MAX_CONNECTIONS and not server.close_idlest():
                    await server.wait_for_room()
                    continue
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:  # another accept took it, or a spurious wake
                    continue
                except OSError as exc:
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        log.warning("control API: accept failed: %s", exc)
                        await trio.sleep(ACCEPT_RETRY_S)
                        continue
                    if exc.errno in ACCEPT_CONNECTION_ERRNOS:
                        continue
                    raise
                nursery.start_soon(server.serve_connection, conn)
    finally:
        close(sock)


class _Gone(Exception):
    """The client reset or shut the connection while we were sending or receiving."""


class _Server:
    """The live connections, which of them are idle, and the one task that enforces their
    deadlines: a connection sets a float per phase (cheaper than a cancel scope with a
    deadline per request), and a connection past it is cancelled within TIMEOUT_CHECK_S."""

    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self.connections: set[_Connection] = set()
        self.idle: dict[_Connection, None] = {}  # in the order they became idle
        self.room = trio.Event()  # set when a connection ends
        self.check_every = min(TIMEOUT_CHECK_S, app.head_timeout / 4, app.body_timeout / 4)

    async def watch_deadlines(self) -> None:
        while True:
            await trio.sleep(self.check_every)
            now = trio.current_time()
            for connection in self.connections:
                if connection.deadline < now:
                    connection.scope.cancel()

    def close_idlest(self) -> bool:
        """Close the connection idle the longest, if any is idle (it ends silently at once:
        it has no request under way)."""
        if not self.idle:
            return False
        connection = next(iter(self.idle))
        self._forget(connection)
        connection.scope.cancel()
        return True

    async def wait_for_room(self) -> None:
        self.room = trio.Event()
        await self.room.wait()

    def _forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        self.idle.pop(connection, None)
        connection.server = None

    async def serve_connection(self, sock: socket.socket) -> None:
        connection = _Connection(self.app, sock, self)
        self.connections.add(connection)
        try:
            try:
                sock.setblocking(False)
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                raise _Gone from None  # reset before we got to it
            await connection.run()
        except _Gone:
            pass  # the client went away
        except Exception:  # a bug here must cost one connection, never the node
            log.exception("control API: connection failed")
        finally:
            self._forget(connection)
            self.room.set()
            close(sock)


class _Connection:
    """One client connection, on a non-blocking socket driven directly (sockio.py); its
    bytes are parsed by http_parser.RequestParser."""

    def __init__(self, app: HttpApp, sock: socket.socket, server: _Server | None = None
                 ) -> None:
        self.app = app
        self.sock = sock
        self.server = server  # None once the server let go of it
        self.parser = RequestParser(app.max_body)
        self.events: deque[Event] = deque()
        self.http10_keep_alive = False
        self.scope = trio.CancelScope()  # cancelled only by _Server, past `deadline`
        self.deadline = math.inf  # of the current phase
        self.request_started = False  # a stall now gets a 408, not a silent close
        self.answering = False  # a stall now (the client stopped reading) just closes

    async def _next_event(self) -> Event | None:
        """The next parser event, receiving as needed; None once the client closed between
        requests."""
        while not self.events:
            try:
                chunk = await receive_some(self.sock, RECEIVE_BYTES)
            except OSError:
                raise _Gone from None
            self.events.extend(self.parser.feed(chunk))
            if not chunk and not self.events:
                return None
        event = self.events.popleft()
        if isinstance(event, Refused):
            raise HttpError(event.status, event.message)
        return event

    async def _send_all(self, data: bytes) -> None:
        try:
            await send_all(self.sock, data)
        except OSError:
            raise _Gone from None

    async def run(self) -> None:
        with self.scope:
            await self._serve_requests()
        timed_out = self.scope.cancel_called and self.server is not None  # not closed as idle
        if timed_out and not self.answering and (self.request_started
                                                 or self.parser.in_message):
            self.deadline = math.inf
            with trio.move_on_after(TIMEOUT_ANSWER_S):
                await self._send(Response("request timed out\n", 408), keep_alive=False,
                                 head=False)

    async def _serve_requests(self) -> None:
        app = self.app
        served = 0
        while True:
            if served and served % REQUESTS_BETWEEN_YIELDS == 0:
                # a pipelining client whose requests never make us wait must not starve
                # others, refused requests included
                await trio.lowlevel.checkpoint()
            served += 1
            self.deadline = trio.current_time() + app.head_timeout
            self.request_started = False
            try:
                if self.events or self.server is None:
                    head = await self._next_event()
                else:  # idle until the next request's first bytes
                    self.server.idle[self] = None
                    try:
                        head = await self._next_event()
                    finally:
                        if self.server is not None:
                            self.server.idle.pop(self, None)
                if head is None:
                    return  # clean close between requests
                assert isinstance(head, Head), head
                self.request_started = True
                self.http10_keep_alive = head.http10  # must be said in the answer
                keep_alive = head.keep_alive
                request = Request(head.method, head.path, head.query, head.headers)
                target = app.resolve(request)
                if isinstance(target, Response):
                    # refused before its body was read: the connection cannot go on
                    # unless there is no body
                    if not head.has_body:
                        await self._read_body(False)
                    await self._answer(target, keep_alive and not head.has_body, head=False)
                    if keep_alive and not head.has_body:
                        continue
                    return
                if head.has_body:
                    self.deadline = trio.current_time() + app.body_timeout
                request._body = await self._read_body(head.expect_continue)
            except HttpError as exc:
                await self._answer(Response(f"{exc}\n", exc.status), keep_alive=False,
                                   head=False)
                return
            self.deadline = math.inf
            try:
                response = await target(request)
            except Exception:
                log.exception("control API: %s %s failed", request.method, request.path)
                response = JSONResponse({"error": "internal", "message": "internal error"}, 500)
            await self._answer(response, keep_alive, head=request.method == "HEAD")
            if not keep_alive:
                return

    async def _answer(self, response: Response, keep_alive: bool, head: bool) -> None:
        self.answering = True
        self.deadline = trio.current_time() + SEND_TIMEOUT_S
        await self._send(response, keep_alive, head)
        self.answering = False

    async def _read_body(self, expect_continue: bool) -> bytes:
        """The request's body, up to its end; "100 Continue" first if the client waits for
        it and has sent none of the body yet."""
        if expect_continue and not self.events:
            await self._send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while True:
            event = await self._next_event()
            if event is None:
                raise HttpError(400, "connection closed inside a request body")
            if isinstance(event, EndOfMessage):
                return bytes(body)
            assert isinstance(event, bytes), event
            body += event

    async def _send(self, response: Response, keep_alive: bool, head: bool) -> None:
        status = response.status_code
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                 f"content-type: {response.media_type}",
                 f"content-length: {len(response.body)}"]
        lines += [f"{name}: {value}" for name, value in response.headers.items()]
        if not keep_alive:
            lines.append("connection: close")
        elif self.http10_keep_alive:
            lines.append("connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        await self._send_all(data if head else data + response.body)
