# System tests of a healed partition: real libp2p hosts on 127.0.0.1, one node isolated with
# the fault hooks (isolate_from on both sides) and healed. Once every node holds every other
# alive again, a healed pair must stay connected (no silent-peer reconnects), answer every
# request and carry gossip both ways.
from __future__ import annotations

import time
from collections import Counter

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee

from p2p import MemberState, Network
from p2p.network import MEMBERSHIP_TOPIC

from p2p_helpers import alive_ids, cluster, wait_for


class _Disconnects(INotifee):
    """Counts closed connections per peer."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.count[str(conn.muxed_conn.peer_id)] += 1

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        pass


def _state(net: Network, peer: str) -> MemberState | None:
    member = net.view.get(peer)
    return None if member is None else member.state


def _hears(net: Network, peer: Network) -> bool:
    """Whether `net` counts `peer` a listener of the membership topic (pubsub hears it)."""
    assert net._pubsub is not None
    topic = net._topic(MEMBERSHIP_TOPIC)
    return peer.peer_id in {str(p) for p in net._pubsub.peer_topics.get(topic, ())}


async def _gossip_reaches(sender: Network, receivers: list[Network], topic: str,
                          timeout: float) -> None:
    """`sender` publishes on `topic` (again every half second: a mesh forms at a heartbeat)
    until every receiver got one of its messages."""
    got: set[str] = set()
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        subscribed = 0

        async def listen(net: Network) -> None:
            nonlocal subscribed
            async with net.subscribe(topic) as sub:
                subscribed += 1
                if subscribed == len(receivers):
                    ready.set()
                async for msg in sub:
                    if msg.author == sender.peer_id:
                        got.add(net.peer_id)
                        return

        for net in receivers:
            nursery.start_soon(listen, net)
        await ready.wait()
        with trio.fail_after(timeout):
            while len(got) < len(receivers):
                await sender.publish(topic, {"from": sender.peer_id})
                with trio.move_on_after(0.5):
                    while len(got) < len(receivers):
                        await trio.sleep(0.02)


async def test_a_healed_node_stays_connected_answers_and_gossips(tmp_path):
    async with cluster(tmp_path, 5) as nodes:
        everyone = {n.peer_id for n in nodes}
        counters = {}
        for net in nodes:
            counters[net.peer_id] = _Disconnects()
            net.host.get_network().register_notifee(counters[net.peer_id])

            async def pong(peer: str, message: object) -> object:
                return message

            net.handle("ping", pong)
        await wait_for(lambda: all(alive_ids(n) == everyone for n in nodes), 20, "5 alive")
        lonely, others = nodes[-1], nodes[:-1]
        period = lonely.heartbeat_every()
        for cycle in range(3):
            await lonely.isolate_from({o.peer_id for o in others})
            for net in others:
                await net.isolate_from({lonely.peer_id})
            await wait_for(lambda: all(_state(n, lonely.peer_id) in (MemberState.DEAD, None)
                                       for n in others), 20,
                           f"the isolated node dead in every other view ({cycle})")
            async with trio.open_nursery() as traffic:
                async def knock(a: Network, b: Network) -> None:
                    # a store's requests: they redial at once, racing discovery's dials
                    while True:
                        try:
                            with trio.fail_after(1):
                                await a.request(b.peer_id, "ping", 0)
                        except Exception:
                            pass
                        await trio.sleep(0.01)

                for net in others:
                    traffic.start_soon(knock, net, lonely)
                    traffic.start_soon(knock, lonely, net)
                for net in nodes:
                    net.heal()
                await wait_for(lambda: all(alive_ids(n) == everyone for n in nodes), 20,
                               f"all 5 alive again after heal {cycle}")
                traffic.cancel_scope.cancel()
            # what the silent-peer logic does to a healed pair whose pubsub stream is stale or
            # that the membership view took back later than its grace (as on the testnet):
            # the peers of the healed node rebuild their pubsub streams to it
            for net in others:
                if lonely.peer_id in net.connected_peers():
                    net._rebuild_pubsub_stream(lonely.peer_id)
            # within one heartbeat period the healed pairs are settled
            await trio.sleep(period)
            before = {n.peer_id: Counter(counters[n.peer_id].count) for n in nodes}
            resets = {n.peer_id: n.metrics["silent_disconnects"] for n in nodes}
            failures: list[str] = []
            # long enough for the silent-peer logic to act twice on a pair it does not hear
            grace = max(3.0, 4 * period)
            watch_until = time.monotonic() + 2 * grace + 2 * period
            rounds = 0
            while time.monotonic() < watch_until:
                for net in others:
                    for a, b in ((net, lonely), (lonely, net)):
                        try:
                            with trio.fail_after(2):
                                assert await a.request(b.peer_id, "ping", rounds) == rounds
                        except Exception as exc:
                            failures.append(f"{a.peer_id[-6:]} -> {b.peer_id[-6:]}: {exc!r}")
                rounds += 1
                await trio.sleep(period / 2)
            assert rounds >= 10  # requests kept going through the whole watch
            assert not failures, f"after heal {cycle}: {len(failures)} failed requests, " \
                                 f"first: {failures[:3]}"
            dropped = {n.peer_id[-6:]: counters[n.peer_id].count - before[n.peer_id]
                       for n in nodes}
            assert not any(dropped.values()), f"after heal {cycle}: connections dropped " \
                                              f"{dropped}"
            assert {n.peer_id: n.metrics["silent_disconnects"] for n in nodes} == resets
            assert all(_hears(net, lonely) and _hears(lonely, net) for net in others
                       if lonely.peer_id in net.connected_peers())
            # gossip flows both ways between the healed node and the rest
            await _gossip_reaches(lonely, others, f"heal-{cycle}-out", 15)
            await _gossip_reaches(others[cycle % len(others)], [lonely], f"heal-{cycle}-in",
                                  15)
