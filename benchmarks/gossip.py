# Benchmark: gossip latency and throughput of tasknet's signed topics against raw py-libp2p.
# Lives here: a cluster of tasknet nodes (1 bootstrap + the rest, one trio process, 127.0.0.1)
# and, after it has stopped, a reference cluster of plain py-libp2p GossipSub hosts connected
# along the same edges, measured the same way. Prints one JSON line.
# Must not live here: anything tasknet itself needs; this script only drives the public API.
#
# Latency: `--messages` messages at `--rate` per second, each from the next node in turn; a
# message's latency runs from the publish call (the harness notes the time under the message's
# key) to its arrival at the last of the other nodes. Throughput: node 1 publishes `--messages`
# messages keeping at most `--window` in flight; a message counts once ALL other nodes have it;
# the rate is completed messages over the time from the first publish to the last completion.
# Messages that make no progress for STALL_SECONDS are counted as lost, never waited for forever.
# The tasknet cluster carries its own membership heartbeats while it is measured: that load is
# part of what tasknet costs, so it is not subtracted. Their interval grows with the cluster
# (`--heartbeat` is its floor): heartbeat_s is the one the nodes used once all were alive.
# The reference keeps py-libp2p's default strict signing, so on both sides every message is
# signed once and checked at every node.
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import trio
from _common import (
    PhaseTimeout,
    finish,
    peer_info,
    percentile,
    phase,
    quiet_libraries,
    ratio,
    raw_host,
)
from libp2p.abc import IHost, ISubscriptionAPI
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p import MemberState, Network, NetworkConfig
from p2p.network import gossipsub_options

TOPIC = "bench"
RAW_TOPIC = "/bench/gossip"
NETWORK_ID = "bench"
STALL_SECONDS = 5.0  # no progress for this long: the messages still missing are lost
MESH_SECONDS = 60.0  # deadline for a cluster to show that gossip reaches every node
MEMBERS_SECONDS = 60.0  # deadline for every tasknet node to list every member alive
CONNECT_SECONDS = 30.0  # deadline for the raw hosts to dial each other


@dataclass
class _Flight:
    sent_at: float
    missing: set[int]
    done_at: float | None = None
    lost: bool = False


class Deliveries:
    """Which node received which benchmark message, and when the last of them did."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_flight = 0
        self._flights: dict[int, _Flight] = {}
        self._next_key = 0
        self._progress = trio.Event()

    def register(self, publisher: int, padding: bytes) -> tuple[int, dict[str, Any]]:
        """A fresh message from `publisher`: its key and the payload to publish."""
        key = self._next_key
        self._next_key += 1
        now = time.perf_counter()
        self._flights[key] = _Flight(now, set(range(self.size)) - {publisher})
        self.in_flight += 1
        return key, {"k": key, "pad": padding}

    def arrived(self, node: int, payload: Any) -> None:
        now = time.perf_counter()
        flight = self._flights.get(payload["k"])
        if flight is None or flight.lost or node not in flight.missing:
            return  # our own message, a late copy of a lost one, or a duplicate
        flight.missing.discard(node)
        if not flight.missing:
            flight.done_at = now
            self.in_flight -= 1
            self._progress.set()
            self._progress = trio.Event()

    def completed_at(self, key: int) -> float | None:
        return self._flights[key].done_at

    def latency(self, key: int) -> float | None:
        """Seconds from publish to arrival at the last other node; None if it never got there."""
        flight = self._flights[key]
        return None if flight.done_at is None else flight.done_at - flight.sent_at

    def _pending(self, keys: list[int]) -> list[int]:
        return [k for k in keys if self._flights[k].done_at is None and not self._flights[k].lost]

    def _give_up(self, keys: list[int]) -> None:
        for key in self._pending(keys):
            self._flights[key].lost = True
            self.in_flight -= 1

    async def _progress_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self._progress.wait()
            return True
        return False

    async def wait_all(self, keys: list[int], stall: float) -> None:
        """Until every key is done; keys still missing after `stall` s of no progress are lost."""
        while self._pending(keys):
            if not await self._progress_within(stall):
                self._give_up(keys)

    async def wait_for_room(self, window: int, stall: float) -> None:
        """Until fewer than `window` messages are in flight, declaring stalled ones lost."""
        while self.in_flight >= window:
            if not await self._progress_within(stall):
                cutoff = time.perf_counter() - stall
                self._give_up([k for k, f in self._flights.items() if f.sent_at < cutoff])


class Cluster(Protocol):
    size: int
    deliveries: Deliveries

    async def publish(self, node: int, payload: dict[str, Any]) -> None: ...


async def send(cluster: Cluster, node: int, padding: bytes) -> int:
    key, payload = cluster.deliveries.register(node, padding)
    await cluster.publish(node, payload)
    return key


# -- the tasknet cluster ---------------------------------------------------------------------
class TasknetCluster:
    def __init__(self, nets: list[Network]) -> None:
        self.nets = nets
        self.size = len(nets)
        self.deliveries = Deliveries(self.size)

    async def publish(self, node: int, payload: dict[str, Any]) -> None:
        await self.nets[node].publish(TOPIC, payload)

    async def drain(self, node: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with self.nets[node].subscribe(TOPIC) as subscription:
            task_status.started()
            async for message in subscription:
                self.deliveries.arrived(node, message.payload)

    def all_see_everyone_alive(self) -> bool:
        everyone = {net.peer_id for net in self.nets}
        return all(
            {m.peer_id for m in net.members() if m.state is MemberState.ALIVE} == everyone
            for net in self.nets
        )

    def discovery_settled(self) -> bool:
        """Every node has as many connections as its discovery aims for (or all peers)."""
        return all(
            len(net.connected_peers()) >= min(net.config.target_connections, self.size - 1)
            for net in self.nets
        )

    def heartbeat_s(self) -> float:
        """The membership heartbeat interval the nodes use now (the slowest node's; they
        agree once each lists every member alive)."""
        return max(net.heartbeat_every() for net in self.nets)

    def edges(self) -> set[tuple[int, int]]:
        """Current connections, as pairs of node indices (smaller first)."""
        index = {net.peer_id: i for i, net in enumerate(self.nets)}
        return {
            (min(i, index[peer]), max(i, index[peer]))
            for i, net in enumerate(self.nets)
            for peer in net.connected_peers()
            if peer in index
        }


def node_config(base: Path, node: int, heartbeat: float, bootstrap: list[str]) -> NetworkConfig:
    """Default settings but the heartbeat floor. Failure detection needs no scaling here: a
    node waits at least 3 and 8 of a member's announced heartbeat intervals before it suspects
    it and declares it dead, and the announced interval is never below the floor."""
    return NetworkConfig(
        data_dir=base / f"node-{node}",
        network_id=NETWORK_ID,
        bootstrap=bootstrap,
        heartbeat_interval=heartbeat,
    )


@asynccontextmanager
async def tasknet_cluster(base: Path, size: int, heartbeat: float) -> AsyncIterator[TasknetCluster]:
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            Network.start(node_config(base, 0, heartbeat, [])))
        nets = [boot]
        for node in range(1, size):
            config = node_config(base, node, heartbeat, [boot.addrs[0]])
            nets.append(await stack.enter_async_context(Network.start(config)))
        cluster = TasknetCluster(nets)
        drains = await stack.enter_async_context(trio.open_nursery())
        stack.callback(drains.cancel_scope.cancel)
        for node in range(size):
            await drains.start(cluster.drain, node)
        yield cluster


# -- the raw py-libp2p reference cluster -----------------------------------------------------
class RawCluster:
    def __init__(self, hosts: list[IHost], pubsubs: list[Pubsub]) -> None:
        self.hosts = hosts
        self.pubsubs = pubsubs
        self.size = len(pubsubs)
        self.deliveries = Deliveries(self.size)

    async def publish(self, node: int, payload: dict[str, Any]) -> None:
        await self.pubsubs[node].publish(RAW_TOPIC, msgpack.packb(payload))

    async def connect(self, edges: set[tuple[int, int]]) -> None:
        with phase("raw: connect along the tasknet cluster's edges", CONNECT_SECONDS):
            async with trio.open_nursery() as dials:
                for a, b in sorted(edges):
                    dials.start_soon(self.hosts[a].connect, peer_info(self.hosts[b]))

    async def drain(self, node: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # py-libp2p drops messages once a subscription holds 32: read it in its own task
        subscription: ISubscriptionAPI = await self.pubsubs[node].subscribe(RAW_TOPIC)
        task_status.started()
        while True:
            message = await subscription.get()
            self.deliveries.arrived(node, msgpack.unpackb(message.data))


def raw_gossipsub() -> GossipSub:
    """py-libp2p's GossipSub with the very router arguments tasknet's Network passes it
    (p2p.network.gossipsub_options), so the ratio measures what tasknet's own layer costs.
    That includes v1.1 only and spam and eclipse protection off: the reference is neither
    throttled (10 msg/s per topic) nor kept from meshing on one IP."""
    return GossipSub(**gossipsub_options())


@asynccontextmanager
async def raw_cluster(size: int) -> AsyncIterator[RawCluster]:
    """`size` raw hosts, each subscribed to the benchmark topic; not yet connected."""
    async with AsyncExitStack() as stack:
        hosts: list[IHost] = []
        pubsubs: list[Pubsub] = []
        for _ in range(size):
            host = await stack.enter_async_context(raw_host())
            gossipsub = raw_gossipsub()
            pubsub = Pubsub(host, gossipsub)  # strict signing: each message signed, verified
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(gossipsub))
            await pubsub.wait_until_ready()
            hosts.append(host)
            pubsubs.append(pubsub)
        cluster = RawCluster(hosts, pubsubs)
        drains = await stack.enter_async_context(trio.open_nursery())
        stack.callback(drains.cancel_scope.cancel)
        for node in range(size):
            await drains.start(cluster.drain, node)
        yield cluster


# -- measurements ----------------------------------------------------------------------------
@dataclass
class Figures:
    latencies: list[float]  # seconds, of the latency-phase messages that reached every node
    latency_lost: int
    msgs_per_s: float
    throughput_lost: int


async def await_mesh(cluster: Cluster, name: str) -> None:
    """Publish probes from each node in turn until one full turn reaches everyone."""
    deliveries = cluster.deliveries
    with phase(f"{name}: gossip reaches every node", MESH_SECONDS):
        streak = 0
        node = 0
        while streak < cluster.size:
            key = await send(cluster, node, b"")
            await deliveries.wait_all([key], STALL_SECONDS)
            streak = streak + 1 if deliveries.completed_at(key) is not None else 0
            node = (node + 1) % cluster.size


async def measure_latency(
    cluster: Cluster, name: str, messages: int, rate: float, padding: bytes
) -> tuple[list[float], int]:
    """Latencies (s) of the messages that reached every node, and how many did not."""
    keys = []
    with phase(f"{name}: latency", messages / rate + 10 * STALL_SECONDS):
        start = trio.current_time()
        for i in range(messages):
            await trio.sleep_until(start + i / rate)
            keys.append(await send(cluster, i % cluster.size, padding))
        await cluster.deliveries.wait_all(keys, STALL_SECONDS)
    delivered = [t for k in keys if (t := cluster.deliveries.latency(k)) is not None]
    return delivered, len(keys) - len(delivered)


async def measure_throughput(
    cluster: Cluster, name: str, messages: int, window: int, padding: bytes
) -> tuple[float, int]:
    """Messages per second delivered to all other nodes from node 1, and how many were lost."""
    deliveries = cluster.deliveries
    publisher = 1  # not the bootstrap node, which every node is connected to
    keys = []
    # every message either completes or is given up after a stall: this bounds the phase
    with phase(f"{name}: throughput", (messages + window) * STALL_SECONDS):
        start = time.perf_counter()
        for _ in range(messages):
            await deliveries.wait_for_room(window, STALL_SECONDS)
            keys.append(await send(cluster, publisher, padding))
        await deliveries.wait_all(keys, STALL_SECONDS)
    finished = [t for k in keys if (t := deliveries.completed_at(k)) is not None]
    rate = len(finished) / (max(finished) - start) if finished else 0.0
    return rate, len(keys) - len(finished)


async def measure(cluster: Cluster, name: str, args: argparse.Namespace) -> Figures:
    padding = bytes(args.payload_bytes)
    await await_mesh(cluster, name)
    latencies, latency_lost = await measure_latency(
        cluster, name, args.messages, args.rate, padding)
    rate, lost = await measure_throughput(cluster, name, args.messages, args.window, padding)
    return Figures(latencies, latency_lost, rate, lost)


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Figures of both clusters and the first error (a phase past its deadline), if any.
    Errors are caught inside each cluster's context, so every node stops cleanly."""
    ours: Figures | None = None
    raw: Figures | None = None
    error: str | None = None
    edges: set[tuple[int, int]] = set()
    heartbeat: float | None = None
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-gossip-") as tmp:
        async with tasknet_cluster(Path(tmp), args.nodes, args.heartbeat) as cluster:
            try:
                with phase("tasknet: every node lists all members alive", MEMBERS_SECONDS):
                    while not cluster.all_see_everyone_alive():
                        await trio.sleep(0.05)
                heartbeat = cluster.heartbeat_s()
                with phase("tasknet: discovery has dialed its targets", MEMBERS_SECONDS):
                    while not cluster.discovery_settled():
                        await trio.sleep(0.05)
                edges = cluster.edges()
                ours = await measure(cluster, "tasknet", args)
            except PhaseTimeout as exc:
                error = str(exc)
    if edges:
        async with raw_cluster(args.nodes) as reference:
            try:
                await reference.connect(edges)
                raw = await measure(reference, "raw", args)
            except PhaseTimeout as exc:
                error = error or str(exc)
    return figures(args, len(edges), heartbeat, ours, raw), error


def figures(
    args: argparse.Namespace, connections: int, heartbeat: float | None, ours: Figures | None,
    raw: Figures | None,
) -> dict[str, Any]:
    def ms(latencies: list[float], q: float) -> float | None:
        return round(percentile(latencies, q) * 1000, 2) if latencies else None

    def rate(side: Figures | None) -> float | None:
        return round(side.msgs_per_s, 2) if side else None

    return {
        "nodes": args.nodes,
        "connections": connections,
        "messages": args.messages,
        "rate": args.rate,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "heartbeat_s": heartbeat,
        "latency_p50_ms": ms(ours.latencies, 50) if ours else None,
        "latency_p99_ms": ms(ours.latencies, 99) if ours else None,
        "latency_lost": ours.latency_lost if ours else None,
        "raw_latency_p50_ms": ms(raw.latencies, 50) if raw else None,
        "raw_latency_p99_ms": ms(raw.latencies, 99) if raw else None,
        "raw_latency_lost": raw.latency_lost if raw else None,
        "ours_msgs_per_s": rate(ours),
        "raw_msgs_per_s": rate(raw),
        "ours_lost": ours.throughput_lost if ours else None,
        "raw_lost": raw.throughput_lost if raw else None,
        "ratio": ratio(ours.msgs_per_s, raw.msgs_per_s) if ours and raw else None,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="gossip latency and throughput: tasknet vs raw py-libp2p GossipSub")
    parser.add_argument("--nodes", type=int, default=10, help="cluster size (>= 2)")
    parser.add_argument("--messages", type=int, default=100,
                        help="messages in the latency phase and in the throughput phase")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="messages per second in the latency phase")
    parser.add_argument("--window", type=int, default=4,
                        help="most throughput-phase messages in flight at once")
    parser.add_argument("--payload-bytes", type=int, default=100,
                        help="padding carried by every benchmark message")
    parser.add_argument("--heartbeat", type=float, default=NetworkConfig.heartbeat_interval,
                        help="least tasknet membership heartbeat interval in seconds; the "
                             "nodes slow down from it as the cluster grows (heartbeat_s in the "
                             "report is the interval they used)")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.messages < 1 or args.window < 1:
        parser.error("need --nodes >= 2 and positive --messages and --window")
    if args.rate <= 0 or args.heartbeat <= 0 or args.payload_bytes < 0:
        parser.error("--rate and --heartbeat must be positive, --payload-bytes not negative")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    quiet_libraries()
    results, error = trio.run(run, args)
    return finish("gossip", results, error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
