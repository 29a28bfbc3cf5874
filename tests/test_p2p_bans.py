# Bans under attack: many identities, each banned right after bad gossip, must never take the
# victim down (py-libp2p's own ban teardown raced its dead-peer handler and ended the pubsub
# service, the host and the node); a banned peer is refused at the door on every protocol
# until its ban expires; an error a peer provokes inside py-libp2p's tasks stays contained.
from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2p import Network, RequestError, libp2p_fixes
from p2p.envelope import seal
from p2p.network import parse_multiaddr

from p2p_helpers import cluster, node_config, wait_for

TOPIC = "/tasknet/test-net/news"


async def _victim_serves(victim: Network, honest: Network) -> None:
    """The victim still answers an honest peer's request."""
    assert await honest.request(victim.peer_id, "echo", {"n": 1}, timeout=10) == {"n": 1}


async def _echo(peer: str, message: object) -> object:
    return message


def _bad_gossip(attacker: Network) -> list[bytes]:
    good = seal(attacker.identity, "test-net", "news", 10**18, {"ok": 1})
    version, body, sig = msgpack.unpackb(good)
    forged = msgpack.packb([version, body.replace(b"ok", b"no"), sig])
    return [forged, os.urandom(64), forged, forged]


async def _attack_until_banned(victim: Network, attacker: Network) -> None:
    full = TOPIC
    victim_id = ID.from_base58(victim.peer_id)
    # the attacker needs to know the victim listens on the topic before publishing to it
    await wait_for(lambda: victim_id in attacker._pubsub.peer_topics.get(full, ()), 15,
                   "the attacker to see the victim's subscription")
    with trio.fail_after(20):
        while not victim.scores.is_banned(attacker.peer_id, time.monotonic()):
            for data in _bad_gossip(attacker):
                try:
                    await attacker._pubsub.publish(full, data)
                except Exception:
                    pass  # the victim may have cut the attacker off already
            await trio.sleep(0.05)


async def test_fifty_identities_banned_in_a_row_do_not_take_the_node_down(tmp_path):
    async with cluster(tmp_path, 2) as (victim, honest):
        victim.handle("echo", _echo)
        async with victim.subscribe("news"):
            await wait_for(lambda: honest.peer_id in victim.connected_peers(), 10,
                           "the honest peer to connect")
            banned = 0
            for batch in range(10):
                async with AsyncExitStack() as stack:
                    attackers = []
                    for i in range(5):
                        cfg = node_config(tmp_path / f"attacker-{batch}-{i}",
                                          bootstrap=[victim.addrs[0]])
                        # not subscribed itself: its own validator would refuse its bad
                        # messages before they leave
                        attackers.append(await stack.enter_async_context(Network.start(cfg)))
                    async with trio.open_nursery() as nursery:
                        for attacker in attackers:
                            nursery.start_soon(_attack_until_banned, victim, attacker)
                    banned += len(attackers)
                    # serving throughout: between batches and while the bans tear down
                    await _victim_serves(victim, honest)
            assert banned == 50
            assert victim.status()["offences"].get("forged", 0) >= 50
            await _victim_serves(victim, honest)
            # gossip from the honest peer still flows to the victim
            async with victim.subscribe("after") as sub:
                with trio.fail_after(10):
                    while True:
                        await honest.publish("after", "still here")
                        with trio.move_on_after(0.5):
                            if (await sub.next()).payload == "still here":
                                break


async def test_a_banned_peer_is_refused_at_the_door_until_the_ban_expires(tmp_path):
    async with cluster(tmp_path, 3) as (victim, honest, attacker):
        victim.handle("echo", _echo)
        victim.scores.ban_seconds = 4.0
        await wait_for(lambda: attacker.peer_id in victim.connected_peers(), 10,
                       "the attacker to connect")
        assert await attacker.request(victim.peer_id, "echo", "before") == "before"
        for _ in range(3):
            victim.penalize(attacker.peer_id, "forged")
        assert victim.scores.is_banned(attacker.peer_id, time.monotonic())
        await wait_for(lambda: attacker.peer_id not in victim.connected_peers(), 10,
                       "the victim to drop the attacker")
        victim_info = info_from_p2p_addr(parse_multiaddr(victim.addrs[0]))
        refused_until = time.monotonic() + 2.0
        tries = 0
        # while banned: a fresh connection comes up (Noise must complete to learn who it
        # is), but no stream of any protocol is served and the victim drops it again
        while time.monotonic() < refused_until:
            tries += 1
            attacker._rpc.forget_peer(victim.peer_id)
            try:
                await attacker.host.connect(victim_info)
            except Exception:
                continue
            with pytest.raises(RequestError):
                await attacker.request(victim.peer_id, "echo", "while banned", timeout=2)
            with pytest.raises((StreamError, EOFError, trio.TooSlowError, SwarmException)):
                with trio.fail_after(3):
                    stream = await attacker.host.new_stream(
                        ID.from_base58(victim.peer_id), [TProtocol("/ipfs/ping/1.0.0")])
                    await stream.write(os.urandom(32))
                    if not await stream.read(32):
                        raise EOFError("ping refused")
            await trio.sleep(0.2)
        assert tries >= 1
        assert victim.metrics["banned_refused"] >= 1
        await _victim_serves(victim, honest)
        # once the ban expires, the peer is served again
        await wait_for(lambda: not victim.scores.is_banned(attacker.peer_id, time.monotonic()),
                       10, "the ban to expire")
        with trio.fail_after(15):
            while True:
                attacker._rpc.forget_peer(victim.peer_id)
                try:
                    await attacker.host.connect(victim_info)
                    if await attacker.request(victim.peer_id, "echo", "after", timeout=2) \
                            == "after":
                        break
                except Exception:
                    await trio.sleep(0.2)


async def test_an_error_inside_a_libp2p_task_is_contained(tmp_path):
    """A py-libp2p background task that raises because of what a peer did ends that task
    (and blames the peer), never the pubsub service, the host or the node."""
    async with cluster(tmp_path, 2) as (victim, other):
        victim.handle("echo", _echo)
        await wait_for(lambda: other.peer_id in victim.connected_peers(), 10, "a connection")
        before = libp2p_fixes.contained_errors()

        async def explode(peer_id: ID) -> None:
            raise KeyError(peer_id)

        victim._pubsub.manager.run_task(explode, ID.from_base58(other.peer_id))
        await wait_for(lambda: libp2p_fixes.contained_errors() > before, 5,
                       "the error to be contained")
        assert victim._pubsub.manager.is_running
        assert await other.request(victim.peer_id, "echo", "alive") == "alive"
        assert victim.scores.score(other.peer_id, time.monotonic()) < 0
