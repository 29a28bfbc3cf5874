# The control API's HTTP/1.1 server (tasknet_node/http.py) on a real loopback socket, spoken
# to byte by byte: keep-alive and pipelining, bodies (Content-Length, chunked, Expect:
# 100-continue), routing, the Host check, and what garbage, oversized and stalled clients get;
# idle connections past the connection bound, failing accepts; and a real node's control API
# against hostile bodies (deep JSON, lone surrogates, upper-case media types) and bad topic
# names (one check, one answer for /publish and /subscribe).
import errno
import json
import os
import resource
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

import pytest
import trio
from api_helpers import served

from tasknet_node.api import MAX_TOPIC_CHARS, ControlApi
from tasknet_node.gossipwatch import watch_gossip
from tasknet_node.http import (
    MAX_CONNECTIONS,
    MAX_JSON_DEPTH,
    HttpApp,
    JSONResponse,
    Request,
    Response,
    Route,
    serve_http,
)
from tasknet_node.kv_extension import KvApi

from kv_helpers import start_kv_node

DEADLINE_S = 10


async def echo(request: Request) -> Response:
    return JSONResponse({"method": request.method, "path": request.path,
                         "params": request.path_params, "query": request.query_params,
                         "body": (await request.body()).decode()})


async def broken(request: Request) -> Response:
    raise RuntimeError("bug in an endpoint")


@asynccontextmanager
async def server(**options):
    app = HttpApp([Route("/kv/{key:path}/{op}", echo, frozenset({"POST"})),
                   Route("/kv/{key:path}", echo, frozenset({"GET", "PUT"})),
                   Route("/broken", broken, frozenset({"GET"}))],
                  trusted_hosts=("127.0.0.1",), **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, app, sock)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def read_response(stream, buffer: bytearray, head: bool = False
                        ) -> tuple[int, dict[str, str], bytes]:
    """One response from `stream` (leftover bytes stay in `buffer`); `head`: an answer to
    HEAD, which has no body."""
    with trio.fail_after(DEADLINE_S):
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed; got {bytes(buffer)!r}"
            buffer += chunk
        end = buffer.index(b"\r\n\r\n")
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[:end + 4]
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(buffer) < length:
            buffer += await stream.receive_some(65536)
        body = bytes(buffer[:length])
        del buffer[:length]
        return status, headers, body


async def closed_by_server(stream, buffer: bytearray) -> bool:
    with trio.fail_after(DEADLINE_S):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return True
            buffer += chunk


async def answered_then_closed(port: int, data: bytes) -> int:
    """Send `data` on a new connection; the status of the one answer, after which the server
    must close the connection."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        buffer = bytearray()
        status = (await read_response(stream, buffer))[0]
        assert await closed_by_server(stream, buffer)
        return status


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:1\r\n{headers}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def test_pipelined_requests_on_one_connection_are_answered_in_order():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request("PUT", "/kv/a%2Fb?consistency=all", b"one")
                              + request("GET", "/kv/x/y") + request("POST", "/kv/k/incr", b"2"))
        buffer = bytearray()
        answers = [await read_response(stream, buffer) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        first, second, third = (json.loads(a[2]) for a in answers)
        assert first == {"method": "PUT", "path": "/kv/a/b", "params": {"key": "a/b"},
                         "query": {"consistency": "all"}, "body": "one"}
        assert second["params"] == {"key": "x/y"} and second["body"] == ""
        assert third["params"] == {"key": "k", "op": "incr"} and third["body"] == "2"
        assert answers[0][1]["content-type"] == "application/json"


async def test_chunked_body_and_expect_continue():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        head = (b"PUT /kv/c HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n"
                b"expect: 100-continue\r\n\r\n")
        await stream.send_all(head)
        buffer = bytearray()
        status, _, _ = await read_response(stream, buffer)
        assert status == 100
        await stream.send_all(b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n")
        status, _, body = await read_response(stream, buffer)
        assert status == 200 and b'"body":"abcdefg"' in body


async def test_routing_errors_and_host_check():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buffer = bytearray()
        await stream.send_all(request("DELETE", "/kv/a"))
        status, headers, _ = await read_response(stream, buffer)
        assert status == 405 and headers["allow"] == "GET, PUT"
        await stream.send_all(request("GET", "/nothing"))
        assert (await read_response(stream, buffer))[0] == 404
        await stream.send_all(b"GET /kv/a HTTP/1.1\r\nhost: evil.example:80\r\n\r\n")
        assert (await read_response(stream, buffer))[0] == 400
        await stream.send_all(request("GET", "/broken"))
        status, _, body = await read_response(stream, buffer)
        assert status == 500 and b"internal" in body
        await stream.send_all(b"HEAD /kv/a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        status, headers, _ = await read_response(stream, buffer, head=True)
        assert status == 200 and int(headers["content-length"]) > 0
        # HEAD has no body: the next answer starts right after the head
        await stream.send_all(request("GET", "/nothing"))
        assert (await read_response(stream, buffer))[0] == 404


@pytest.mark.parametrize("garbage, status", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(50) + b"\r\n\r\n", 400),
    (b"GET /kv/a HTTP/2.0\r\n\r\n", 505),
    (b"GET /kv/a HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET kv/a HTTP/1.1\r\n\r\n", 400),
    (b"PUT /kv/a HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
    (b"PUT /kv/a HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n", 413),
    (b"PUT /kv/a HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501),
    (b"GET /kv/a HTTP/1.1\r\nx: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    (b"PUT /kv/a HTTP/1.1\r\ncontent-length: \xb2\r\n\r\n", 400),  # a digit to isdigit()
    (b"PUT /kv/a HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx", 400),
    (b"PUT /kv/a HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", 400),
    (b"PUT /kv/a HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n"
     b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (b"GET /kv/a HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400),
    (b"GET /kv/a\x01 HTTP/1.1\r\n\r\n", 400),
])
async def test_garbage_gets_an_error_and_the_server_goes_on(garbage, status):
    async with server() as port:
        assert await answered_then_closed(port, garbage) == status
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request("GET", "/kv/still-here"))
            assert (await read_response(stream, bytearray()))[0] == 200


async def test_a_stalled_client_is_answered_408_and_dropped():
    async with server(head_timeout=0.3, body_timeout=0.3) as port:
        # a head that never ends
        assert await answered_then_closed(port, b"GET /kv/a HTTP/1.1\r\nhost: 127.0") == 408
        # a body shorter than announced, then silence
        assert await answered_then_closed(port, b"PUT /kv/a HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                                 b"content-length: 10\r\n\r\nabc") == 408


async def test_http10_closes_after_the_answer():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /kv/a HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n")
        buffer = bytearray()
        status, headers, _ = await read_response(stream, buffer)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_by_server(stream, buffer)


async def test_an_encoded_newline_is_part_of_the_key_not_an_alias():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request("PUT", "/kv/foo%0A", b"v"))
        status, _, body = await read_response(stream, bytearray())
        assert status == 200 and json.loads(body)["params"] == {"key": "foo\n"}


async def test_a_refused_request_with_a_body_is_answered_without_reading_it():
    async with server(max_body=1000) as port:
        # 404 and a declared body that never comes: answered at once, then closed
        assert await answered_then_closed(port, b"PUT /nothing HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                                b"content-length: 900\r\n\r\n") == 404


async def test_a_body_that_never_comes_gets_408():
    async with server(body_timeout=0.3) as port:
        # and no body at all
        assert await answered_then_closed(port, b"PUT /kv/a HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                                b"content-length: 5\r\n\r\n") == 408


async def test_http10_keep_alive_is_confirmed_and_honoured():
    async with server() as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buffer = bytearray()
        for _ in range(2):
            await stream.send_all(b"GET /kv/a HTTP/1.0\r\nhost: 127.0.0.1\r\n"
                                  b"connection: Keep-Alive\r\n\r\n")
            status, headers, _ = await read_response(stream, buffer)
            assert status == 200 and headers["connection"] == "keep-alive"


def complete_responses(buffer: bytes) -> int:
    """How many whole responses (head and Content-Length body) `buffer` begins with."""
    count, start = 0, 0
    while (end := buffer.find(b"\r\n\r\n", start)) >= 0:
        head = buffer[start:end].decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        if len(buffer) < end + 4 + length:
            break
        count, start = count + 1, end + 4 + length
    return count


async def answers_on(sock: socket.socket, buffer: bytearray, wanted: int) -> None:
    """Read from `sock` until `buffer` holds `wanted` whole responses."""
    with trio.fail_after(DEADLINE_S):
        while complete_responses(buffer) < wanted:
            await trio.lowlevel.wait_readable(sock)
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed"
            buffer += chunk


async def test_a_pipelining_client_cannot_starve_another_connection():
    # A pipelines many requests the server refuses at once (404: no endpoint runs, nothing
    # makes the server wait); B's one request must be answered before A's last one is.
    pipelined = 400  # their answers fit in loopback socket buffers: sending never waits
    async with server() as port:
        a = socket.create_connection(("127.0.0.1", port))
        a.setblocking(False)
        try:
            async with await trio.open_tcp_stream("127.0.0.1", port) as b:
                a.sendall(request("GET", "/missing"))  # both connections accepted and served
                await answers_on(a, bytearray(), 1)
                await b.send_all(request("GET", "/kv/warm"))
                assert (await read_response(b, bytearray()))[0] == 200
                a.sendall(request("GET", "/missing") * pipelined)
                await b.send_all(request("GET", "/kv/x"))
                assert (await read_response(b, bytearray()))[0] == 200
                answered = bytearray()
                try:
                    while chunk := a.recv(1 << 20):
                        answered += chunk
                except BlockingIOError:
                    pass  # what A had been sent by the time B had its answer
                assert complete_responses(answered) < pipelined
                await answers_on(a, answered, pipelined)  # and A still gets every answer
                assert answered.count(b"HTTP/1.1 404 ") == pipelined
        finally:
            a.close()


# -- hostile clients against a real node's control API ------------------------------------
@asynccontextmanager
async def node_api(tmp_path):
    """A real node (libp2p on 127.0.0.1, its KV store on LevelDB, one replica per key) with
    its control API served on a free loopback port; an httpx client for it."""
    async with AsyncExitStack() as stack:
        kv = await start_kv_node(stack, tmp_path / "node", [], replicas=1)
        api = ControlApi(kv.net)
        KvApi(kv).register(api)
        async with served(api) as client:
            yield client


def nested(depth: int) -> bytes:
    return b'{"value": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


async def test_hostile_bodies_get_400_not_500(tmp_path):
    json_type = {"content-type": "application/json"}
    async with node_api(tmp_path) as client:
        # nesting: up to MAX_JSON_DEPTH levels is parsed (and the value left to the store,
        # which holds 16 levels), deeper (even far past the depth that exhausts json's
        # recursion) is bad_json
        assert (await client.put("/kv/deep", content=nested(16),
                                 headers=json_type)).status_code == 200
        answer = await client.put("/kv/deep", content=nested(MAX_JSON_DEPTH), headers=json_type)
        assert answer.status_code == 400 and answer.json()["error"] == "bad_value"
        for depth in (MAX_JSON_DEPTH + 1, 990, 5000):
            answer = await client.put("/kv/deep", content=nested(depth), headers=json_type)
            assert answer.status_code == 400, (depth, answer.text)
            assert answer.json()["error"] == "bad_json"
            assert f"deeper than {MAX_JSON_DEPTH}" in answer.json()["message"]
        deep_publish = b'{"topic": "t", "payload": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        assert (await client.post("/publish", content=deep_publish,
                                  headers=json_type)).status_code == 400
        # a lone surrogate (a JSON \ud800 escape) in a key or topic is the client's error
        for path, body in (("/kv-batch", rb'{"put": {"a\ud800": 1}}'),
                           ("/kv-read", rb'{"keys": ["\udfff"]}'),
                           ("/publish", rb'{"topic": "t\ud800", "payload": 1}'),
                           ("/publish", rb'{"topic": "t", "payload": "\ud800"}')):
            answer = await client.post(path, content=body, headers=json_type)
            assert answer.status_code == 400, (path, body, answer.status_code, answer.text)
        # media types are case-insensitive
        shouted = {"content-type": "APPLICATION/JSON; Charset=UTF-8"}
        assert (await client.put("/kv/loud", content=b'{"value": 1}',
                                 headers=shouted)).status_code == 200
        assert (await client.get("/kv/loud")).json()["value"] == 1
        published = await client.post("/publish", content=b'{"topic": "t", "payload": 1}',
                                       headers={"content-type": "Application/Json"})
        assert published.status_code == 200, published.text
        assert (await client.put("/kv/loud", content=b'{"value": 1}',
                                 headers={"content-type": "text/plain"})).status_code == 415
        assert (await client.get("/status")).status_code == 200


async def test_publish_and_subscribe_refuse_a_bad_topic_alike(tmp_path):
    async with AsyncExitStack() as stack:
        kv = await start_kv_node(stack, tmp_path / "node", [], replicas=1)
        api = ControlApi(kv.net)
        await stack.enter_async_context(watch_gossip(kv.net, api))
        client = await stack.enter_async_context(served(api))
        json_type = {"content-type": "application/json"}
        # empty, the p2p layer's own, too long, a lone surrogate (a JSON \ud800 escape)
        for topic in ("", "members", "x" * (MAX_TOPIC_CHARS + 1), "t\ud800"):
            published = await client.post("/publish", headers=json_type, content=json.dumps(
                {"topic": topic, "payload": 1}).encode())
            subscribed = await client.post("/subscribe", headers=json_type,
                                           content=json.dumps({"topic": topic}).encode())
            assert published.status_code == subscribed.status_code == 400, topic
            assert published.json() == subscribed.json(), topic
            assert published.json()["error"] == "bad_topic" and published.json()["message"]
        longest = "x" * MAX_TOPIC_CHARS
        assert (await client.post("/publish", json={"topic": longest, "payload": 1})
                ).status_code == 200
        assert (await client.post("/subscribe", json={"topic": longest})).status_code == 200


@contextmanager
def open_files_allowed(wanted: int) -> Iterator[None]:
    """The soft RLIMIT_NOFILE raised to `wanted` (within the hard limit) for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target <= soft:
        yield
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_keep_alive_connections_cannot_lock_the_api_out():
    idle_count = 1000
    assert idle_count > MAX_CONNECTIONS
    idle: list[socket.socket] = []
    with open_files_allowed(4 * idle_count):
        try:
            async with server() as port:
                # every one connected (accepted, or its handshake waits for the server to
                # make room in the listen backlog): past MAX_CONNECTIONS that is only done
                # once the server closes idle ones, not the 30 s head timeout later
                with trio.fail_after(DEADLINE_S):
                    for _ in range(idle_count):
                        sock = socket.socket()
                        idle.append(sock)
                        sock.setblocking(False)
                        sock.connect_ex(("127.0.0.1", port))
                        await trio.lowlevel.wait_writable(sock)
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    with trio.fail_after(3):
                        await stream.send_all(request("GET", "/kv/status"))
                        assert (await read_response(stream, bytearray()))[0] == 200
        finally:
            for sock in idle:
                sock.close()


class FlakyListener(socket.socket):
    """A listening socket whose next accepts fail with the errnos in `failures`."""

    failures: list[int]

    def accept(self):  # type: ignore[override]
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


def flaky_listener(*failures: int) -> FlakyListener:
    sock = FlakyListener()
    sock.failures = list(failures)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_accept_retries_after_capacity_and_aborted_connection_errors():
    app = HttpApp([Route("/kv/{key:path}", echo, frozenset({"GET"}))])
    sock = flaky_listener(errno.EMFILE, errno.ECONNABORTED, errno.ENOBUFS)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, app, sock)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request("GET", "/kv/a"))
            assert (await read_response(stream, bytearray()))[0] == 200
        assert sock.failures == []
        nursery.cancel_scope.cancel()


def leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_errors(inner)]
    return [exc]


async def test_accept_gives_up_on_an_error_that_is_not_about_capacity():
    # say the socket was closed under the server: accepting again can only fail again
    app = HttpApp([Route("/kv/{key:path}", echo, frozenset({"GET"}))])
    sock = flaky_listener(*[errno.EBADF] * 1000)
    client = socket.create_connection(sock.getsockname())  # makes the socket readable
    try:
        with trio.fail_after(DEADLINE_S):
            try:
                await serve_http(app, sock)
            except BaseException as exc:  # noqa: B036  (the nursery may group it)
                errors = leaf_errors(exc)
            else:
                errors = []
        assert [getattr(e, "errno", None) for e in errors] == [errno.EBADF], errors
        assert len(sock.failures) == 999  # tried once, not in a loop
    finally:
        client.close()
