# Cancelled requests on real libp2p hosts (Noise + Yamux) on 127.0.0.1: cancelled at every
# point of their write they leave the connection and the stream usable (the workarounds of
# p2p/libp2p_fixes.py and the whole-message writes of p2p/rpc.py), and nothing waiting.
import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.libp2p_fixes import _write_frame_whole

from p2p_helpers import alive_ids, cluster, wait_for


async def echo(peer_id: str, message: object) -> object:
    return message


async def request_cancelled_after(turns: int, a, b, message: object) -> None:
    """Start a request from a to b and cancel it after `turns` turns of the scheduler."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.request, b.peer_id, "echo", message)
        for _ in range(turns):
            await trio.sleep(0)
        nursery.cancel_scope.cancel()


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
            await request_cancelled_after(turns, a, b, payload)
            assert await a.request(b.peer_id, "echo", turns, timeout=5) == turns, turns
        assert not connection.is_closed
        assert network.get_connections(ID.from_base58(b.peer_id)) == [connection]
        # and the gossip of both peers still flows over it
        heard_before = a.view.get(b.peer_id).last_seen
        await wait_for(lambda: a.view.get(b.peer_id).last_seen > heard_before, 10,
                       "a heartbeat from b after the cancelled requests")


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
            await request_cancelled_after(turns, a, b, big)
            assert await a.request(b.peer_id, "echo", turns, timeout=10) == turns, turns
        assert b.status()["metrics"]["rpc_refused"] == 0
        assert b.status()["offences"] == {}  # a was not blamed for a garbled frame


async def test_a_cancelled_request_leaves_nothing_waiting_for_its_reply(tmp_path):
    async with cluster(tmp_path, 2) as (a, b):
        arrived = trio.Semaphore(0)

        async def never_answers(peer_id: str, message: object) -> object:
            arrived.release()
            await trio.sleep_forever()

        b.handle("hang", never_answers)
        await wait_for(lambda: alive_ids(a) == {a.peer_id, b.peer_id}, 15,
                       "the two nodes to meet")
        for _ in range(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.request, b.peer_id, "hang", "hello")
                with trio.fail_after(10):
                    await arrived.acquire()  # b has it: a is waiting for the reply
                nursery.cancel_scope.cancel()
        channels = list(a._rpc._channels.values())
        assert channels and all(not channel.pending for channel in channels)
