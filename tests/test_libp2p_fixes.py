# The workarounds of p2p/libp2p_fixes.py on real libp2p hosts (Noise + Yamux) and sockets on
# 127.0.0.1. Cancelled requests, cancelled at every point of their write, leave the connection
# and the stream usable (with the whole-message writes of p2p/rpc.py) and nothing waiting;
# Yamux credits a sender once per half window and holds one that nobody reads to a window;
# TCP reads take what the socket holds and keep the byte order.
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p import ConfigError, Network, RequestError, libp2p_fixes
from p2p.libp2p_fixes import _write_frame_whole

from p2p_helpers import alive_ids, cluster, node_config, wait_for


async def echo(peer_id: str, message: object) -> object:
    return message


async def cancelled_after(turns: int, *calls: Callable[[], Awaitable[object]]) -> None:
    """Start `calls` and cancel them after `turns` turns of the scheduler."""
    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(call)
        for _ in range(turns):
            await trio.sleep(0)
        nursery.cancel_scope.cancel()


async def stream_to(a, b, name: str, handler) -> object:
    """A raw libp2p stream from a to b's `handler` (protocol /tasknet-test/<name>/1), once
    the two nodes have met."""
    protocol = f"/tasknet-test/{name}/1"
    b.host.set_stream_handler(protocol, handler)
    await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15, "the two nodes to meet")
    return await a.host.new_stream(ID.from_base58(b.peer_id), [protocol])


async def test_requests_cancelled_mid_write_do_not_break_the_connection(tmp_path):
    async with cluster(tmp_path, 2) as (a, b):
        assert Yamux._write_frame is _write_frame_whole  # installed by Network.start
        b.handle("echo", echo)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15, "the two nodes to meet")
        assert await a.request(b.peer_id, "echo", "first") == "first"
        network = a.host.get_network()
        (connection,) = network.get_connections(ID.from_base58(b.peer_id))
        payload = {"blob": b"x" * 3000}
        # a request cancelled after k scheduler turns: one k lands between the Noise
        # encryption of its frame and the send, which broke the connection before the fix
        for turns in range(40):
            await cancelled_after(turns, partial(a.request, b.peer_id, "echo", payload))
            assert await a.request(b.peer_id, "echo", turns, timeout=5) == turns, turns
        assert not connection.is_closed
        assert network.get_connections(ID.from_base58(b.peer_id)) == [connection]
        # and the gossip of both peers still flows over it
        heard_before = a.view.get(b.peer_id).last_seen
        await wait_for(lambda: a.view.get(b.peer_id).last_seen > heard_before, 10,
                       "a heartbeat from b after the cancelled requests")


async def test_raw_stream_writes_cancelled_mid_frame_do_not_break_the_connection(tmp_path):
    """The Yamux fix alone, below p2p/rpc.py (which writes whole messages itself): py-libp2p's
    own writers (gossip, window updates, stream closes) go through it too."""
    async with cluster(tmp_path, 2) as (a, b):
        b.handle("echo", echo)

        async def sink(stream) -> None:
            try:
                while await stream.read(65536):
                    pass
            except Exception:  # the stream ends as it ends; only the connection matters here
                pass

        stream = await stream_to(a, b, "sink", sink)
        (connection,) = a.host.get_network().get_connections(ID.from_base58(b.peer_id))
        for turns in range(30):
            await cancelled_after(turns, partial(stream.write, b"z" * 3000))
            assert await a.request(b.peer_id, "echo", turns, timeout=5) == turns, turns
        assert not connection.is_closed


async def test_a_large_request_cancelled_halfway_leaves_no_partial_frame(tmp_path):
    async with cluster(tmp_path, 2) as (a, b):
        b.handle("echo", echo)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15,
                       "the two nodes to meet")
        big = {"blob": b"y" * 1_500_000}  # many Yamux frames, and more than one window
        assert await a.request(b.peer_id, "echo", big) == big
        # cancelled after k scheduler turns: some k land between two frames of the message,
        # which left half a frame on the stream, and b refused the next request as garbage
        for turns in range(0, 80, 4):
            await cancelled_after(turns, partial(a.request, b.peer_id, "echo", big))
            assert await a.request(b.peer_id, "echo", turns, timeout=10) == turns, turns
        assert b.status()["metrics"]["rpc_refused"] == 0
        assert b.status()["offences"] == {}  # a was not blamed for a garbled frame


async def test_a_cancelled_request_leaves_nothing_waiting_for_its_reply(tmp_path):
    async with cluster(tmp_path, 2) as (a, b):
        arrived = trio.Semaphore(0)
        release = trio.Event()

        async def answers_late(peer_id: str, message: object) -> object:
            """Answers only once the test lets it, after a has given up on the request (b
            reads no more requests from a while 16 of them are unanswered)."""
            arrived.release()
            await release.wait()
            return "too late"

        b.handle("hang", answers_late)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15,
                       "the two nodes to meet")
        for _ in range(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.request, b.peer_id, "hang", "hello")
                with trio.fail_after(10):
                    await arrived.acquire()  # b has it: a is waiting for the reply
                nursery.cancel_scope.cancel()
            release.set()
            release = trio.Event()
        # and cancelled while another request's large message holds the stream's write lock
        for turns in range(0, 40, 4):
            await cancelled_after(turns,
                                  partial(a.request, b.peer_id, "hang", b"w" * 1_000_000),
                                  partial(a.request, b.peer_id, "hang", "queued behind it"))
            release.set()
            release = trio.Event()
        release.set()  # from now on b answers at once
        assert await a.request(b.peer_id, "hang", "the late replies were skipped") == "too late"
        channels = list(a._rpc._channels.values())
        assert channels and all(not channel.pending for channel in channels)


async def test_a_peer_that_takes_no_bytes_costs_its_connection_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(libp2p_fixes, "FRAME_WRITE_GRACE_S", 0.5)
    async with cluster(tmp_path, 2) as (a, b):
        b.handle("echo", echo)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15,
                       "the two nodes to meet")
        assert await a.request(b.peer_id, "echo", "before") == "before"
        b_id = ID.from_base58(b.peer_id)
        (connection,) = a.host.get_network().get_connections(b_id)
        # the socket under Noise stops taking bytes, as when the peer's buffers are full
        tcp = connection.muxed_conn.secured_conn.conn.read_writer.read_write_closer
        writable, closed = tcp.write, trio.Event()
        tcp_close = tcp.close

        async def never_written(data: bytes) -> None:
            await closed.wait()  # until the socket is closed (then nothing is written)

        async def close() -> None:
            closed.set()
            await tcp_close()

        tcp.write, tcp.close = never_written, close
        started = trio.current_time()
        with pytest.raises(RequestError):
            await a.request(b.peer_id, "echo", "stuck", timeout=0.5)
        took = trio.current_time() - started
        assert took < 0.5 + 0.5 + 1.0, took  # the request's timeout plus the frame's grace
        # the stuck frame may be another one's (a SWIM message writing when the socket
        # stopped, the request waiting behind it): its own timeout and grace close the
        # connection then, a moment later
        await wait_for(lambda: connection.is_closed and closed.is_set(), 5,
                       "the stuck connection to be closed")
        tcp.write = writable

        async def answered() -> bool:
            try:
                return await a.request(b.peer_id, "echo", "after", timeout=2) == "after"
            except RequestError:
                return False

        with trio.fail_after(15):  # on a new connection
            while not await answered():
                await trio.sleep(0.2)


async def test_request_traffic_sends_window_updates_only_at_half_the_window(tmp_path,
                                                                          monkeypatch):
    """py-libp2p credited the sender after nearly every read: a window-update frame per
    request or reply received. Now only once half a stream's window is consumed, and
    transfers of many windows still flow both ways."""
    async with cluster(tmp_path, 2) as (a, b):
        b.handle("echo", echo)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15,
                       "the two nodes to meet")
        assert await a.request(b.peer_id, "echo", "first") == "first"
        frame_types: list[tuple[int, int, int]] = []  # (type, flags, length) of each frame
        installed = Yamux._write_frame

        async def recording(self: Yamux, data: bytes) -> None:
            frame_types.append((data[1], int.from_bytes(data[2:4], "big"),
                                int.from_bytes(data[8:12], "big")))
            await installed(self, data)

        monkeypatch.setattr(Yamux, "_write_frame", recording)
        requests = 300
        for i in range(requests):
            assert await a.request(b.peer_id, "echo", {"i": i, "pad": b"p" * 500}) == {
                "i": i, "pad": b"p" * 500}
        data_frames = [f for f in frame_types if f[0] == 0 and f[2] > 0]
        credit_updates = [f for f in frame_types if f[0] == 1 and f[1] == 0 and f[2] > 0]
        assert len(data_frames) >= 2 * requests  # every request and reply was seen here
        # 300 x ~530 bytes each way is about 160 KB: at most one half-window (128 KiB)
        # update per direction, where there were hundreds
        assert len(credit_updates) <= 4, len(credit_updates)
        big = {"blob": b"w" * 3_000_000}  # many windows of 256 KiB each way: it flows only
        for _ in range(2):  # if the receivers keep crediting the senders
            assert await a.request(b.peer_id, "echo", big, timeout=30) == big
        assert len([f for f in frame_types if f[0] == 1 and f[1] == 0 and f[2] > 0]) > len(
            credit_updates)


async def test_a_peer_that_stops_reading_holds_at_most_a_window_of_our_data(tmp_path):
    """Flow control holds: py-libp2p credited the sender after each small read, twice the
    bytes read, so a peer that had read a little and then stopped still took in more than
    its window; now a writer to such a stream stops once the window is full, and goes on
    when the peer reads again. And a reader that keeps reading, slowly, in small reads,
    keeps a large write flowing (py-libp2p's writer gives up after 5 s without credit)."""
    async with cluster(tmp_path, 2) as (a, b):
        reading = trio.Event()
        received: list[int] = []
        far_ends: list[object] = []
        total = 2_000_000

        async def stalling_sink(stream) -> None:
            far_ends.append(stream)
            while sum(received) < 100_000:  # small reads first: each one credited a before
                received.append(len(await stream.read(1000)))
            await reading.wait()
            while sum(received) < total:
                received.append(len(await stream.read(65536)))

        stream = await stream_to(a, b, "stalling-sink", stalling_sink)
        written = trio.Event()

        async def write_all() -> None:
            await stream.write(b"q" * total)
            written.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_all)
                await wait_for(lambda: far_ends and sum(received) >= 100_000, 10,
                               "b to read its first 100 kB")
                far_end = far_ends[0].muxed_stream
                # b has received all a was allowed to send: its window is used up
                await wait_for(lambda: far_end.recv_window == 0, 10,
                               "b's window to fill up")
                assert not written.is_set()
                buffered = len(far_end.conn.stream_buffers[far_end.stream_id])
                assert buffered <= far_end.target_recv_window, (buffered,
                                                                far_end.target_recv_window)
                reading.set()  # b reads again: the credit lets the rest through
                with trio.fail_after(20):
                    await written.wait()
            await wait_for(lambda: sum(received) == total, 10, "b to read everything")
        finally:
            await stream.reset()


async def test_a_slow_reader_keeps_a_writer_past_its_window_going(tmp_path):
    """A reader too slow to consume half a window within the 5 s that py-libp2p's writer
    waits for credit (1 kB every 60 ms) is credited read by read once the writer is nearly
    out of credit, so the writer goes on instead of failing its write."""
    async with cluster(tmp_path, 2) as (a, b):
        window = 256 * 1024  # py-libp2p's initial window, grown only by half-window credits
        total = window + 20_000
        received: list[int] = []
        writer_done = trio.Event()

        async def slow_sink(stream) -> None:
            while not writer_done.is_set():
                received.append(len(await stream.read(1000)))
                await trio.sleep(0.06)  # a slow consumer, on purpose
            while sum(received) < total:
                received.append(len(await stream.read(65536)))

        stream = await stream_to(a, b, "slow-sink", slow_sink)
        try:
            with trio.fail_after(60):
                await stream.write(b"s" * total)  # raised after 5 s without credit
            writer_done.set()
            await wait_for(lambda: sum(received) == total, 30, "b to read everything")
        finally:
            await stream.reset()


async def test_tcp_reads_take_what_the_socket_holds_and_keep_the_order(tmp_path):
    """Noise reads each message as a 2-byte length and a body: two socket receives each.
    Messages that wait in the socket together now cost one receive between them, and the
    bytes come out exactly as sent, whatever sizes the reads ask for, from one reader or
    two at once."""
    libp2p_fixes.apply_all()  # as a Network's start does
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    messages = [bytes([i % 251]) * (1 + (i * 37) % 700) for i in range(400)]
    wire = b"".join(len(m).to_bytes(2, "big") + m for m in messages)
    accepted: list[trio.SocketStream] = []
    client: trio.SocketStream | None = None
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                async def accept() -> None:
                    accepted.append(await listeners[0].accept())

                nursery.start_soon(accept)
                client = await trio.open_tcp_stream("127.0.0.1", port)
            server = accepted[0]
            receives = 0
            receive_some = server.receive_some

            async def counted(max_bytes: int | None = None) -> bytes:
                nonlocal receives
                receives += 1
                return await receive_some(max_bytes)

            server.receive_some = counted  # type: ignore[method-assign]
            reader = TrioTCPStream(server)
            await client.send_all(wire)  # all of it waits in the socket before the reads
            got = []
            for _ in messages:
                length = int.from_bytes(await read_exactly(reader, 2), "big")
                got.append(await read_exactly(reader, length))
            assert got == messages
            assert receives < len(messages) // 4, receives  # was 2 per message
            # a read of no given size (or a negative one) takes what is kept first
            await client.send_all(b"tail-and-more")
            assert await read_exactly(reader, 4) == b"tail"
            rest = b""
            while len(rest) < 9:
                rest += await reader.read(-1 if rest else None)
            assert rest == b"-and-more"
            # two readers at once, asking for different sizes: in the order the reads
            # return, the bytes are the stream's
            pieces: list[bytes] = []

            async with trio.open_nursery() as readers:
                async def read_in(size: int) -> None:
                    while True:
                        pieces.append(await reader.read(size))
                        if sum(map(len, pieces)) >= len(wire):
                            readers.cancel_scope.cancel()  # the other waits for more

                readers.start_soon(read_in, 7)
                readers.start_soon(read_in, 1000)
                readers.start_soon(client.send_all, wire)
            assert b"".join(pieces) == wire
            await client.aclose()
            assert await reader.read() == b""  # end of stream, as before
    finally:
        for stream in [*accepted, *([client] if client else [])]:
            await stream.aclose()
        for listener in listeners:
            await listener.aclose()


async def test_a_port_another_node_listens_on_is_refused(tmp_path):
    """py-libp2p's listeners set SO_REUSEPORT, so a second node could bind a running node's
    port and start, with the kernel splitting connections between the two."""
    async with cluster(tmp_path, 1) as (first,):
        port = first.addrs[0].split("/tcp/")[1].split("/")[0]
        taken = node_config(tmp_path / "second", listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        with pytest.raises(ConfigError, match="in use"):
            async with Network.start(taken):
                pytest.fail("a second node started on a port the first listens on")
        # the first node still takes connections on its port
        joiner = node_config(tmp_path / "third", bootstrap=[first.addrs[0]])
        async with Network.start(joiner) as third:
            await wait_for(lambda: alive_ids(third) == {first.peer_id, third.peer_id}, 15,
                           "a third node to join the first through its port")
    # stopped, the first node leaves no listener behind (py-libp2p's stayed open): the port
    # refuses connections, and a node of this process may listen on it again
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
    async with Network.start(taken) as again:
        assert f"/tcp/{port}/" in again.addrs[0]


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: its socket fds in LISTEN state)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _system_tasks_named(name: str) -> int:
    root = trio.lowlevel.current_root_task()
    tasks = [t for nursery in root.child_nurseries for t in nursery.child_tasks]
    return sum(name in t.name for t in tasks)


async def test_a_failed_start_leaves_no_listener_behind(tmp_path):
    async with cluster(tmp_path, 1) as (first,):
        port = int(first.addrs[0].split("/tcp/")[1].split("/")[0])
        before_ports, before_tasks = _listening_ports(), _system_tasks_named("_run_server")
        half_taken = node_config(tmp_path / "second", listen=[
            "/ip4/127.0.0.1/tcp/0", f"/ip4/127.0.0.1/tcp/{port}"])
        with pytest.raises(ConfigError, match="in use"):
            async with Network.start(half_taken):
                pytest.fail("a node started on a port another listens on")
        assert _listening_ports() == before_ports  # the tcp/0 listener was closed
        assert _system_tasks_named("_run_server") == before_tasks  # and the failed one's task


async def test_a_stopped_node_closes_the_connections_it_dialed(tmp_path):
    async with cluster(tmp_path, 1) as (first,):
        dialer = node_config(tmp_path / "dialer", bootstrap=[first.addrs[0]])
        async with Network.start(dialer) as second:
            await wait_for(lambda: second.peer_id in first.connected_peers(), 15,
                           "the second node to dial the first")
        await wait_for(lambda: second.peer_id not in first.connected_peers(), 5,
                       "the first node to see the stopped node's connection closed")
