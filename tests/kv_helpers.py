# Helpers for KV system tests: real nodes (libp2p on 127.0.0.1, LevelDB in tmp dirs).
from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

import crdt
from kv import KV, KVConfig
from kv.forwarding import OPS_PROTOCOL
from p2p import Network
from shard import Keyspace, Store

from p2p_helpers import alive_ids, node_config, wait_for

# py-libp2p's gossip costs CPU per heartbeat; five nodes in one process share one core
FAST_NET = {"heartbeat_interval": 0.5, "heartbeat_per_member": 0.1, "suspect_after": 3.0,
            "dead_after": 6.0}
FAST_KV = {"anti_entropy_interval": 1.0, "rebalance_interval": 0.5, "hint_interval": 0.3,
           "request_timeout": 10.0}


async def start_kv_node(stack: AsyncExitStack, data_dir: Path, bootstrap: list[str],
                        net_overrides: dict | None = None, **kv_overrides) -> KV:
    net = await stack.enter_async_context(
        Network.start(node_config(data_dir, bootstrap=bootstrap,
                                  **{**FAST_NET, **(net_overrides or {})})))
    return await stack.enter_async_context(
        KV.start(net, data_dir, KVConfig(**{**FAST_KV, **kv_overrides})))


async def start_kv_cluster(stack: AsyncExitStack, base: Path, size: int,
                           **kv_overrides) -> list[KV]:
    first = await start_kv_node(stack, base / "node0", [], **kv_overrides)
    nodes = [first]
    for i in range(1, size):
        nodes.append(await start_kv_node(stack, base / f"node{i}", [first.net.addrs[0]],
                                         **kv_overrides))
    await wait_for_ring(nodes)
    return nodes


async def wait_for_ring(nodes: list[KV], timeout: float = 15) -> float:
    """Wait until every node holds every other alive and in its ring; returns the wait.
    A restarted member is alive everywhere within about a second (0.5 to 1.6 s measured on
    2 shared cores; it took up to 16 s while a stopped node left a connection open at its
    peers); the default leaves a wide margin for a loaded CI machine."""
    everyone = {kv.me for kv in nodes}
    return await wait_for(
        lambda: all(alive_ids(kv.net) >= everyone and set(kv.ring.members) == everyone
                    for kv in nodes), timeout, "every node alive in every ring")


def stall_forwarded_ops(kv: KV) -> trio.Event:
    """Make `kv` take the ops other coordinators forward to it (kv-ops) and not answer, as a
    paused process or a cut link would, while it goes on answering membership (so nobody
    suspects it) and replication. Set the returned event to let it go on: it then handles
    the ops that waited, late."""
    resume = trio.Event()

    async def stalled(peer: str, message: object) -> object:
        await resume.wait()
        return await kv.writes.on_ops(peer, message)

    kv.net.handle(OPS_PROTOCOL, kv.authority.members_only(OPS_PROTOCOL, stalled))
    return resume


def key_forwarded_to(coordinator: KV, mutator: str, prefix: str) -> str:
    """A key `coordinator` does not replicate whose first replica is `mutator`."""
    for i in range(100_000):
        key = f"{prefix}{i}"
        replicas = coordinator.ring.preference_list(key.encode())
        if replicas[0] == mutator and coordinator.me not in replicas:
            return key
    raise AssertionError(f"no key of {mutator} outside {coordinator.me}")


def foreign_keys(kv: KV) -> int:
    """Keys a running node holds in partitions it does not own (handed off but not dropped)."""
    owned = kv.ring.partitions_of(kv.me)
    return sum(kv.store.count(p) for p in range(kv.ring.partitions) if p not in owned)


def stored_keys(data_dir: Path) -> dict[bytes, bytes]:
    """Every key and state in a stopped node's LevelDB."""
    keyspace = Keyspace(KVConfig().partitions)
    with Store(data_dir / "store", merge=crdt.merge_encoded, keyspace=keyspace,
               create=False) as store:
        return {key: state for p in range(store.keyspace.partitions) if store.count(p)
                for key, state in store.iterate(p)}


def copies_on_disk(data_dirs: list[Path]) -> Counter[bytes]:
    """How many of the stopped nodes' data dirs hold each key."""
    holders: Counter[bytes] = Counter()
    for data_dir in data_dirs:
        holders.update(stored_keys(data_dir).keys())
    return holders


class NodeHandle:
    """One KV node that a test can stop and start again (same data dir, same identity).
    Each run lives in its own task of the test's nursery, so nodes stop in any order."""

    def __init__(self, nursery: trio.Nursery, data_dir: Path, bootstrap: list[str],
                 **kv_overrides) -> None:
        self.nursery = nursery
        self.data_dir = data_dir
        self.bootstrap = bootstrap
        self.kv_overrides = kv_overrides
        self.kv: KV | None = None
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None

    async def start(self) -> KV:
        self._stop, self._stopped = trio.Event(), trio.Event()
        await self.nursery.start(self._run, self._stop, self._stopped)
        assert self.kv is not None
        return self.kv

    async def _run(self, stop: trio.Event, stopped: trio.Event,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with AsyncExitStack() as stack:
                self.kv = await start_kv_node(stack, self.data_dir, self.bootstrap,
                                              **self.kv_overrides)
                task_status.started()
                await stop.wait()
        finally:
            self.kv = None
            stopped.set()

    async def stop(self) -> None:
        if self._stop is not None and self._stopped is not None:
            self._stop.set()
            await self._stopped.wait()
            self._stop = self._stopped = None


async def join(nodes: list[NodeHandle], data_dir: Path, **kv_overrides) -> KV:
    """Start one more node through `nodes[0]` and wait until every node has it in its ring.
    It goes into `nodes` before it starts, so that `handles` stops it even if it fails."""
    first = nodes[0].kv
    assert first is not None
    joiner = NodeHandle(nodes[0].nursery, data_dir, [first.net.addrs[0]], **kv_overrides)
    nodes.append(joiner)
    newcomer = await joiner.start()
    await wait_for_ring([n.kv for n in nodes if n.kv is not None])
    return newcomer


@asynccontextmanager
async def handles(base: Path, size: int, **kv_overrides) -> AsyncIterator[list[NodeHandle]]:
    """`size` restartable nodes, all stopped on exit even when the test fails."""
    async with trio.open_nursery() as nursery:
        nodes = [NodeHandle(nursery, base / "node0", [], **kv_overrides)]
        try:
            first = await nodes[0].start()
            for i in range(1, size):
                nodes.append(NodeHandle(nursery, base / f"node{i}", [first.net.addrs[0]],
                                        **kv_overrides))
                await nodes[-1].start()
            await wait_for_ring([n.kv for n in nodes if n.kv is not None])
            yield nodes
        finally:
            for node in reversed(nodes):
                await node.stop()
