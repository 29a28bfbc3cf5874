# The workarounds of p2p/libp2p_fixes.py, on real libp2p hosts (Noise + Yamux) on 127.0.0.1:
# requests cancelled at every point of their write leave the connection usable.
import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.libp2p_fixes import _write_frame_whole

from p2p_helpers import alive_ids, cluster, wait_for


async def echo(peer_id: str, message: object) -> object:
    return message


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
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.request, b.peer_id, "echo", payload)
                for _ in range(turns):
                    await trio.sleep(0)
                nursery.cancel_scope.cancel()
            assert await a.request(b.peer_id, "echo", turns, timeout=5) == turns, turns
        assert not connection.is_closed
        assert network.get_connections(ID.from_base58(b.peer_id)) == [connection]
        # and the gossip of both peers still flows over it
        heard_before = a.view.get(b.peer_id).last_seen
        await wait_for(lambda: a.view.get(b.peer_id).last_seen > heard_before, 10,
                       "a heartbeat from b after the cancelled requests")
