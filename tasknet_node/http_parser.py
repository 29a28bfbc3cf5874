# The control API's HTTP/1.1 request parser, sans-IO: `RequestParser.feed(bytes)` returns the
# events those bytes complete (a request head, body bytes, the end of a request, or the error
# that ends the connection), in the style of h11. The byte-level parsing is llhttp's (the
# parser of Node.js, through httptools); this module adds what the API needs around it: its
# limits (head size, header count, body size), the checks llhttp leaves to its user (HTTP
# version, request target, repeated framing headers, transfer codings other than chunked),
# and the request as the router wants it (decoded path, query, headers by lower-case name).
# benchmarks/http_parser.py measured it at about half the time per request of the hand-written
# parser it replaced.
# Must not live here: sockets, clocks, deadlines, routing (http.py), any endpoint.
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

import httptools

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; a head may exceed it by one feed
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 64 * 1024 * 1024
_SINGLE = frozenset({"content-length", "host", "transfer-encoding"})  # may not repeat


class HttpError(Exception):
    """A request the server refuses before any endpoint sees it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Head:
    """A request's line and headers: everything but its body."""

    method: str
    path: str  # percent-decoded
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    keep_alive: bool  # the connection may serve another request after this one
    http10: bool  # an HTTP/1.0 keep-alive must be confirmed in the answer
    has_body: bool
    expect_continue: bool  # the client waits for "100 Continue" before sending the body


@dataclass(slots=True)
class EndOfMessage:
    """The request's body (if any) is complete."""


@dataclass
class Refused:
    """The bytes are not a request this server serves: answer `status`, close. The last
    event a parser gives."""

    status: int
    message: str


Event = Head | bytes | EndOfMessage | Refused


class RequestParser:
    """The requests of one connection, from its bytes as they come. `feed(b"")` says the
    client closed its side: a request cut short there is refused."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._error: HttpError | None = None
        self._refused: Refused | None = None
        self._in_message = False
        self._in_head = False
        self._head_size = 0  # bytes of the current head seen in callbacks
        self._head_fed = 0  # bytes fed since the feed the current head began in
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._body_size = 0
        self._close_after = False

    @property
    def in_message(self) -> bool:
        """A request has begun and is not complete."""
        return self._in_message

    def feed(self, data: bytes) -> list[Event]:
        if self._refused is not None:
            return [self._refused]
        if not data:
            if self._in_message:
                where = "head" if self._in_head else "body"
                return self._refuse(HttpError(400, f"connection closed inside a request {where}"))
            return []
        if self._in_head:
            self._head_fed += len(data)
            if self._head_fed > MAX_HEAD_BYTES:
                return self._refuse(HttpError(431, "request head too large"))
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # a CONNECT or an Upgrade: request; neither is served (see on_headers_complete)
        except httptools.HttpParserCallbackError as exc:
            error = self._error or exc.__context__
            return self._refuse(error if isinstance(error, HttpError) else HttpError(400, str(exc)))
        except httptools.HttpParserError as exc:
            if self._close_after and not self._in_message:
                pass  # bytes after the last request the connection serves: ignored
            else:
                return self._refuse(HttpError(400, f"malformed request: {exc}"))
        events, self._events = self._events, []
        return events

    def _refuse(self, error: HttpError) -> list[Event]:
        self._refused = Refused(error.status, str(error))
        events, self._events = self._events, []
        return [*events, self._refused]

    def _fail(self, status: int, message: str) -> None:
        self._error = HttpError(status, message)
        raise self._error

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._head_size = self._head_fed = self._header_count = self._body_size = 0
        self._url = b""
        self._headers = {}

    def on_url(self, url: bytes) -> None:
        self._url += url  # in pieces only when the line came in pieces
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES:
            self._fail(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: not used
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
            self._fail(431, "too many headers" if self._header_count > MAX_HEADERS
                       else "request head too large")
        key = name.decode("ascii").lower()  # llhttp lets only token characters through
        if key in _SINGLE and key in self._headers:
            self._fail(400, f"repeated {key} header")
        self._headers[key] = value.rstrip(b" \t").decode("latin-1")  # llhttp: leading ones

    def on_headers_complete(self) -> None:
        self._in_head = False
        version = self._parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._fail(505, "only HTTP/1.0 and HTTP/1.1 are served")
        target = self._url.decode("latin-1")
        if not target.startswith("/"):
            self._fail(400, "request target must be a path")
        headers = self._headers
        encoding = headers.get("transfer-encoding")
        if encoding is not None and encoding.lower() != "chunked":
            self._fail(501, f"transfer-encoding {encoding!r} is not supported")
        length_text = headers.get("content-length")
        length = 0 if length_text is None else int(length_text)  # llhttp: digits only
        if length > self.max_body:
            self._fail(413, f"body larger than {self.max_body} bytes")
        http11 = version == "1.1"
        keep_alive = self._parser.should_keep_alive()
        connection = headers.get("connection")
        if keep_alive and connection is not None and "upgrade" in {
                t.strip() for t in connection.lower().split(",")}:
            keep_alive = False  # after an upgrade request the bytes are not HTTP: serve, close
        self._close_after = not keep_alive
        raw_path, _, query = target.partition("?")
        expect = headers.get("expect")
        self._events.append(Head(
            self._parser.get_method().decode("ascii"),
            unquote(raw_path) if "%" in raw_path else raw_path,
            dict(parse_qsl(query, keep_blank_values=True)) if query else {},
            headers, keep_alive, keep_alive and not http11,
            encoding is not None or length > 0,
            http11 and expect is not None and expect.lower() == "100-continue",
        ))

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            self._fail(413, f"body larger than {self.max_body} bytes")
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(EndOfMessage())
