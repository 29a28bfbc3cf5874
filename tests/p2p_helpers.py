# Helpers for system tests that run real libp2p nodes on 127.0.0.1 inside one trio run.
from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from p2p import MemberState, Network, NetworkConfig

FAST = {"heartbeat_interval": 0.3, "heartbeat_per_member": 0.05, "suspect_after": 1.5,
        "dead_after": 3.0}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def node_config(data_dir: Path, network: str = "test-net", **overrides) -> NetworkConfig:
    return NetworkConfig(data_dir=data_dir, network_id=network, **{**FAST, **overrides})


@asynccontextmanager
async def cluster(base: Path, size: int, network: str = "test-net",
                  **overrides) -> AsyncIterator[list[Network]]:
    """A bootstrap node plus `size - 1` nodes that know only the bootstrap."""
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            Network.start(node_config(base / f"{network}-0", network, **overrides)))
        nodes = [boot]
        for i in range(1, size):
            cfg = node_config(base / f"{network}-{i}", network, bootstrap=[boot.addrs[0]],
                              **overrides)
            nodes.append(await stack.enter_async_context(Network.start(cfg)))
        yield nodes


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.05)
    return time.monotonic() - start


def alive_ids(net: Network) -> set[str]:
    return {m.peer_id for m in net.members() if m.state is MemberState.ALIVE}
