# Benchmark: the control API's HTTP/1.1 request parser (tasknet_node/http_parser.py: llhttp
# through httptools, with the API's limits and checks) against bare httptools (the least glue
# that gives the router what it needs: the floor) and h11 (pure Python), on the same request
# byte streams, measured in the same run. Each turns a stream into what the router needs:
# method, percent-decoded path, query parameters, headers by lower-case name, body,
# keep-alive; the results are checked equal before anything is timed.
# Streams: a GET /status as urllib sends it, a PUT /kv/key with a small JSON body, and
# --pipelined keep-alive GETs in one stream; a new parser per stream, as per connection.
# Figures: *_us, wall time per request (medians over --rounds rounds of --streams streams,
# rounds alternating between parsers); ratio_<parser>_<stream> = its time / the own parser's.
# (History, not printed by this script: when the parser was chosen, a run of these streams
# against the hand-written parser it replaced gave 7.1, 12.4, 5.7 us for that parser and 3.4,
# 6.9, 2.9 us for bare httptools.)
# Must not live here: the parser itself.
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import finish, median, ratio  # noqa: E402

try:
    import httptools
except ImportError:  # reported as "not installed"
    httptools = None
try:
    import h11
except ImportError:
    h11 = None

from tasknet_node.http_parser import Head, RequestParser  # noqa: E402

Parsed = tuple[str, str, dict[str, str], dict[str, str], bytes, bool]
Parse = Callable[[bytes], list[Parsed]]

GET_STATUS = (b"GET /status HTTP/1.1\r\nAccept-Encoding: identity\r\nHost: 127.0.0.1:40123\r\n"
              b"User-Agent: Python-urllib/3.11\r\nConnection: close\r\n\r\n")
PUT_BODY = b'{"value": {"name": "alice", "tags": ["a", "b"], "n": 42}, "consistency": "quorum"}'
PUT_KV = (b"PUT /kv/users%%2F42?override_skew=false HTTP/1.1\r\nAccept-Encoding: identity\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\nHost: 127.0.0.1:40123\r\n"
          b"User-Agent: Python-urllib/3.11\r\n\r\n" % len(PUT_BODY)) + PUT_BODY
KEEP_ALIVE_GET = b"GET /kv/counter%3A7 HTTP/1.1\r\nhost: 127.0.0.1:40123\r\n\r\n"


def _target(raw: str) -> tuple[str, dict[str, str]]:
    path, _, query = raw.partition("?")
    return unquote(path), dict(parse_qsl(query, keep_blank_values=True))


def own(stream: bytes) -> list[Parsed]:
    parser = RequestParser()
    out: list[Parsed] = []
    head: Head | None = None
    body = bytearray()
    for event in parser.feed(stream):
        if isinstance(event, Head):
            head, body = event, bytearray()
        elif isinstance(event, bytes):
            body += event
        else:  # end of message
            assert head is not None
            out.append((head.method, head.path, head.query, head.headers, bytes(body),
                        head.keep_alive))
    return out


class _HttptoolsProtocol:
    """httptools' callbacks, collecting what the router needs."""

    def __init__(self) -> None:
        self.out: list[Parsed] = []
        self.parser: Any = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("ascii").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        path, query = _target(self.url.decode("latin-1"))
        self.out.append((self.parser.get_method().decode("ascii"), path, query, self.headers,
                         bytes(self.body), self.parser.should_keep_alive()))


def httptools_parse(stream: bytes) -> list[Parsed]:
    protocol = _HttptoolsProtocol()
    protocol.parser = httptools.HttpRequestParser(protocol)
    protocol.parser.feed_data(stream)
    return protocol.out


def h11_parse(stream: bytes) -> list[Parsed]:
    # h11 reads the next pipelined request only once the answer to the one before was sent:
    # its figure includes writing a minimal answer per request
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    out: list[Parsed] = []
    request: Any = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            request, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            path, query = _target(request.target.decode("latin-1"))
            headers = {k.decode("ascii"): v.decode("latin-1") for k, v in request.headers}
            keep_alive = conn.their_state is h11.DONE and not any(
                k == b"connection" and b"close" in v.lower() for k, v in request.headers)
            out.append((request.method.decode("ascii"), path, query, headers, bytes(body),
                        keep_alive))
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
        elif event is h11.NEED_DATA or event is h11.PAUSED:
            break
    return out


def _per_request_us(parse: Parse, stream: bytes, requests: int, streams: int) -> float:
    started = time.perf_counter()
    for _ in range(streams):
        parse(stream)
    return (time.perf_counter() - started) * 1e6 / (streams * requests)


def run(args: argparse.Namespace, out: dict[str, Any]) -> None:
    parsers: dict[str, Parse] = {"own": own}
    for name, module, parse in (("httptools", httptools, httptools_parse),
                                ("h11", h11, h11_parse)):
        if module is None:
            out[name] = "not installed"
        else:
            parsers[name] = parse
    streams = {"get_status": (GET_STATUS, 1), "put_kv": (PUT_KV, 1),
               "pipelined": (KEEP_ALIVE_GET * args.pipelined, args.pipelined)}
    for label, (stream, requests) in streams.items():
        reference = own(stream)
        assert len(reference) == requests, label
        samples: dict[str, list[float]] = {}
        for name, parse in parsers.items():
            # the same parse, or the comparison means nothing
            assert parse(stream) == reference, (name, label, parse(stream), reference)
            _per_request_us(parse, stream, requests, max(1, args.streams // 10))  # warm up
        for _ in range(args.rounds):
            for name, parse in parsers.items():
                samples.setdefault(name, []).append(
                    _per_request_us(parse, stream, requests, args.streams))
        for name, values in samples.items():
            out[f"{name}_{label}_us"] = round(median(values), 2)
        for name in parsers:
            if name != "own":
                out[f"ratio_{name}_{label}"] = ratio(out[f"{name}_{label}_us"],
                                                     out[f"own_{label}_us"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=5000, help="streams per parser and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pipelined", type=int, default=16,
                        help="keep-alive requests in the pipelined stream")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"streams": args.streams, "rounds": args.rounds,
                           "pipelined": args.pipelined}
    try:
        run(args, out)
    except Exception as exc:
        return finish("http_parser", out, f"{type(exc).__name__}: {exc}")
    return finish("http_parser", out, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
