# Interop with a real js-libp2p peer (tests/interop/js/peer.mjs: `libp2p` 3, `@libp2p/gossipsub`
# 17 with its default StrictSign policy) over TCP, Noise and Yamux on 127.0.0.1: the js peer
# accepts the gossip tasknet publishes (it carries the libp2p pubsub signature), and tasknet
# accepts the signed gossip the js peer publishes, even with unsigned gossip refused; each
# pings and identifies the other; and tasknet dials a listening js peer (given as its
# bootstrap peer, which speaks none of tasknet's own protocols) and gossips with it.
# Needs Node.js and `npm ci --prefix tests/interop/js` (bash scripts/setup); without them the
# test fails, it never skips.
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trio
from libp2p.host.ping import PingService
from libp2p.peer.id import ID

from p2p import Network
from p2p.envelope import open_envelope, seal
from p2p.identity import Identity

from p2p_helpers import node_config, wait_for

JS_DIR = Path(__file__).resolve().parent / "interop" / "js"
NETWORK = "test-net"
TOPIC = "news"
FULL_TOPIC = f"/tasknet/{NETWORK}/{TOPIC}"


class JsPeer:
    """The js-libp2p peer as a process, with an identity of its own: its stdout (JSON lines) in
    a file, commands on stdin; killed when its `with` block ends, even on failure."""

    def __init__(self, base: Path, dial: str | None) -> None:
        self.identity = Identity.generate()
        self.peer_id = str(self.identity.peer_id)
        node = shutil.which("node")
        assert node is not None, "Node.js is missing: install it and run bash scripts/setup"
        assert (JS_DIR / "node_modules" / "@libp2p" / "gossipsub").is_dir(), (
            "the js-libp2p test peer is not installed: run bash scripts/setup "
            "(npm ci --prefix tests/interop/js)")
        self.out, self.err = base / "js-peer.out", base / "js-peer.err"
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen(
                [node, str(JS_DIR / "peer.mjs"), *(["--dial", dial] if dial else []),
                 "--topic", FULL_TOPIC, "--seed", bytes(self.identity.signing_key).hex()],
                stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=JS_DIR, text=True)

    def events(self, kind: str) -> list[dict[str, Any]]:
        events = []
        for line in self.out.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if event.get("event") == kind:
                events.append(event)
        return events

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the js peer exited ({self.proc.returncode}): "
                                 f"{self.err.read_text()[-2000:]}")
        return True

    def command(self, **command: str) -> None:
        """One line on the peer's stdin (see peer.mjs: publish, ping, identify)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def publish(self, data: bytes) -> None:
        self.command(publish=data.hex())

    def answered(self, kind: str, failed: str) -> list[dict[str, Any]]:
        """The peer's `kind` events so far; its `failed` events fail the test at once."""
        self.alive()
        if self.events(failed):
            raise AssertionError(f"the js peer reported {self.events(failed)}")
        return self.events(kind)

    def __enter__(self) -> JsPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    async def gossip_to(self, net: Network, sub: Any, payload: Any) -> Any:
        """Publish a tasknet envelope of this peer's key (signed with the libp2p pubsub
        signature by js-libp2p); the message `net`'s subscription `sub` then delivers from
        another author than itself."""
        self.publish(seal(self.identity, NETWORK, TOPIC, 1, payload))
        with trio.fail_after(10):
            got = await sub.next()
            while got.author == net.peer_id:  # tasknet's own message, delivered locally
                got = await sub.next()
        return got

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def in_mesh(net: Network, peer: str) -> bool:
    assert net._pubsub is not None
    mesh = getattr(net._pubsub.router, "mesh", {})
    return ID.from_base58(peer) in mesh.get(FULL_TOPIC, set())


async def test_js_libp2p_peer_and_tasknet_accept_each_others_gossip(tmp_path):
    # the next release's setting: only signed gossip is accepted
    config = node_config(tmp_path / "tasknet", NETWORK, accept_unsigned_gossip=False)
    async with Network.start(config) as net, net.subscribe(TOPIC) as sub:
        with JsPeer(tmp_path, net.addrs[0]) as js:
            js_id = js.peer_id
            await wait_for(lambda: js.alive() and js.events("ready"), 30, "the js peer to start")
            assert js.events("ready")[0]["peer_id"] == js_id
            await wait_for(lambda: js.alive() and js_id in net.connected_peers(), 15,
                           "the js peer to connect")
            await wait_for(lambda: js.alive() and in_mesh(net, js_id)
                           and any(e["peer"] == net.peer_id and e["topic"] == FULL_TOPIC
                                   for e in js.events("graft")),
                           15, "tasknet and the js peer to graft each other on the topic")

            # tasknet -> js: js's StrictSign validation accepts the message
            await net.publish(TOPIC, {"hello": "js"})
            await wait_for(lambda: js.alive() and js.events("message"), 10,
                           "the js peer to receive tasknet's gossip")
            message = js.events("message")[0]
            assert (message["type"], message["from"], message["topic"]) == (
                "signed", net.peer_id, FULL_TOPIC)
            assert len(bytes.fromhex(message["seqno"])) == 8
            envelope = open_envelope(bytes.fromhex(message["data"]), network=NETWORK,
                                     channel=TOPIC, max_size=config.max_gossip_size)
            assert envelope.payload == {"hello": "js"}

            # js -> tasknet: a tasknet envelope of the js peer's key, published (and signed
            # with the libp2p pubsub signature) by js-libp2p
            got = await js.gossip_to(net, sub, {"hello": "tasknet"})
            assert (got.author, got.payload) == (js_id, {"hello": "tasknet"})
            assert net.metrics["gossip_rejected"] == 0
            assert not net.status()["offences"]


async def test_js_peer_and_tasknet_ping_and_identify_each_other(tmp_path):
    async with Network.start(node_config(tmp_path / "tasknet", NETWORK)) as net, \
            net.subscribe(TOPIC):
        with JsPeer(tmp_path, net.addrs[0]) as js:
            js_id = js.peer_id
            await wait_for(lambda: js.alive() and js_id in net.connected_peers(), 30,
                           "the js peer to connect")
            # js -> tasknet: /ipfs/ping/1.0.0 answered, identify lists what tasknet serves
            js.command(ping=net.peer_id)
            await wait_for(lambda: js.answered("pong", "ping_failed"), 15,
                           "the js peer's ping to be answered")
            assert js.events("pong")[0]["rtt_ms"] >= 0
            js.command(identify=net.peer_id)
            await wait_for(lambda: js.answered("identified", "identify_failed"), 15,
                           "the js peer to identify tasknet")
            theirs = set(js.events("identified")[0]["protocols"])
            assert {"/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"} <= theirs, theirs
            assert any(p.startswith("/meshsub/") for p in theirs), theirs
            assert any(p.startswith(f"/tasknet/{NETWORK}/") for p in theirs), theirs

            # tasknet -> js: py-libp2p's ping over the same connection, and what identify
            # told tasknet of the js peer
            with trio.fail_after(15):
                rtts = await PingService(net.host).ping(ID.from_base58(js_id), ping_amt=3)
            assert len(rtts) == 3 and all(rtt >= 0 for rtt in rtts)

            def js_protocols() -> set[str]:
                try:
                    return set(net.host.get_peerstore().get_protocols(ID.from_base58(js_id)))
                except Exception:  # not identified yet
                    return set()
            await wait_for(lambda: {"/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"} <= js_protocols(),
                           15, "tasknet to learn the js peer's protocols")
            assert js.alive() and js_id in net.connected_peers()
            assert not net.status()["offences"]


async def test_tasknet_dials_a_listening_js_peer_and_they_gossip(tmp_path):
    with JsPeer(tmp_path, None) as js:
        js_id = js.peer_id
        await wait_for(lambda: js.alive() and js.events("ready"), 30, "the js peer to start")
        js_addr = f"{js.events('ready')[0]['addrs'][0]}/p2p/{js_id}"
        # the js peer as the bootstrap peer: tasknet dials it, and its membership join there
        # finds no tasknet protocol; that is no offence, and the connection serves gossip
        config = node_config(tmp_path / "tasknet", NETWORK, bootstrap=[js_addr])
        async with Network.start(config) as net, net.subscribe(TOPIC) as sub:
            await wait_for(lambda: js.alive() and js_id in net.connected_peers(), 15,
                           "tasknet to dial the js peer")
            await wait_for(lambda: js.alive() and in_mesh(net, js_id), 15,
                           "tasknet to graft the js peer on the topic")
            await net.publish(TOPIC, {"hello": "js"})
            await wait_for(lambda: js.alive() and js.events("message"), 10,
                           "the js peer to receive tasknet's gossip")
            assert js.events("message")[0]["from"] == net.peer_id
            got = await js.gossip_to(net, sub, {"hello": "tasknet"})
            assert (got.author, got.payload) == (js_id, {"hello": "tasknet"})
            assert js_id in net.connected_peers()
            assert not net.status()["offences"]
