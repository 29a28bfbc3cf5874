# Shared helpers of the benchmark scripts (imported by gossip.py and rpc.py, among others).
# Lives here: phase deadlines, percentiles, ratios, the one-line JSON report and the raw
# py-libp2p host (TCP + Noise + Yamux, no tasknet code besides the process-wide Yamux setting
# tasknet makes) that p2p benchmarks use as reference.
# Must not live here: any measurement itself, or anything that tasknet's p2p package provides.
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from p2p.libp2p_fixes import apply_all as apply_libp2p_fixes

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

log = logging.getLogger(__name__)


class PhaseTimeout(Exception):
    """A benchmark phase did not finish within its deadline."""


@contextmanager
def phase(name: str, seconds: float) -> Iterator[None]:
    """Run a block under a deadline; on expiry raise PhaseTimeout naming the phase.
    Each phase's duration goes to stderr, so a slow run shows where its time went."""
    started = time.perf_counter()
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise PhaseTimeout(f"{name}: not done within {seconds:.0f}s") from None
    print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             step: float = 0.5) -> Any:
    """Poll `condition` every `step` seconds until it returns something true (returned);
    TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def ratio(ours: float, reference: float) -> float:
    return round(ours / reference, 3) if reference > 0 else 0.0


def quiet_libraries() -> None:
    """Keep py-libp2p's and tasknet's log chatter (on stderr) to real errors."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)


def report(figures: dict[str, Any]) -> None:
    """Print the benchmark's single JSON line."""
    print(json.dumps(figures, sort_keys=True), flush=True)


def run_steps(steps: Sequence[tuple[str, Callable[[], None]]]) -> str | None:
    """Run a benchmark's measurement steps in order, each one whatever happened to the ones
    before (the figures they store stay reported); each step's time goes to stderr. The
    first failure, as "name: error", or None."""
    error = None
    for name, step in steps:
        started = time.perf_counter()
        try:
            step()
        except Exception as exc:  # report what was measured, and the first failure
            traceback.print_exc()
            error = error or f"{name}: {type(exc).__name__}: {exc}"
        print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return error


def finish(name: str, figures: dict[str, Any], error: str | None) -> int:
    """Report the figures (with `error`, also said on stderr, when the run failed); the exit
    code."""
    if error:
        figures["error"] = error
        print(f"{name} benchmark: {error}", file=sys.stderr)
    report(figures)
    return 1 if error else 0


def peer_info(host: IHost) -> PeerInfo:
    return PeerInfo(host.get_id(), list(host.get_addrs()))


@asynccontextmanager
async def raw_host() -> AsyncIterator[IHost]:
    """A plain py-libp2p host on 127.0.0.1 with an Ed25519 identity, Noise and Yamux.

    The automatic connection manager is off, so the host is connected to exactly the peers
    a benchmark dials: the reference then has the same topology as the tasknet nodes.
    tasknet's fixes to py-libp2p (Yamux's window credit, frames written whole, TCP reads
    ahead) hold for the whole process, so the reference cannot differ from tasknet there:
    they are applied here, as tasknet applies them, whether or not a tasknet node has
    started in this process yet."""
    apply_libp2p_fixes()
    key_pair = create_ed25519_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    listen = [multiaddr.Multiaddr(LOOPBACK)]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        listen_addrs=listen,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    stopping = False
    try:
        async with host.run(listen_addrs=listen):
            yield host
            stopping = True
    except Exception as exc:
        if not stopping:
            raise
        # py-libp2p's pubsub can still be handed a message by a peer while its service
        # nursery closes; the host has stopped either way
        log.warning("py-libp2p reported an error while stopping a host: %r", exc)
