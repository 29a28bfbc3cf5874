# Benchmark: request/response over one stream, tasknet's `Network.request` against a raw
# py-libp2p stream, measured in the same run in alternating rounds. Prints one JSON line.
# Lives here: two tasknet nodes with an echo handler, two plain py-libp2p hosts with a
# length-prefixed echo written directly on `host.new_stream`, and the timing loops.
# Must not live here: anything tasknet itself needs; this script only drives the public API.
#
# Round trips: sequential requests with a small payload, one at a time, so every round trip
# waits for the previous reply. Bulk: sequential requests with a large payload that the server
# echoes back; MB/s counts payload bytes in both directions (10^6 bytes per MB). Each round
# measures ours, then raw, back to back. A side's figure is the median over rounds; each ratio
# is the median over rounds of ours/raw within the round (robust to load from other processes
# that changes between rounds); `ratio` is the lower of the two.
from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio
from _common import PhaseTimeout, finish, median, peer_info, phase, quiet_libraries, raw_host
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError

from p2p import Network, NetworkConfig

ECHO = "echo"
RAW_ECHO = TProtocol("/bench/echo/1.0.0")
NETWORK_ID = "bench"
LENGTH = struct.Struct(">I")
WARMUP_ROUND_TRIPS = 20
CONNECT_SECONDS = 30.0

class EchoSide(Protocol):
    """One side of the comparison: a client that can reach an echo server."""

    async def connect(self) -> None: ...

    async def round_trip(self, payload: bytes) -> bytes: ...


# -- tasknet side --------------------------------------------------------------------------
async def echo_handler(peer_id: str, message: Any) -> Any:
    return message


class TasknetEcho:
    def __init__(self, client: Network, server: Network) -> None:
        self.client = client
        self.server = server

    async def connect(self) -> None:
        with phase("ours: nodes connected", CONNECT_SECONDS):
            while self.server.peer_id not in self.client.connected_peers():
                await trio.sleep(0.02)

    async def round_trip(self, payload: bytes) -> bytes:
        reply: bytes = await self.client.request(self.server.peer_id, ECHO, payload)
        return reply


@asynccontextmanager
async def tasknet_pair(base: Path) -> AsyncIterator[TasknetEcho]:
    """Two tasknet nodes, the second serving the echo handler and dialing the first."""
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            Network.start(NetworkConfig(data_dir=base / "client", network_id=NETWORK_ID)))
        server = await stack.enter_async_context(Network.start(NetworkConfig(
            data_dir=base / "server", network_id=NETWORK_ID, bootstrap=[client.addrs[0]])))
        server.handle(ECHO, echo_handler)
        yield TasknetEcho(client, server)


# -- raw py-libp2p side --------------------------------------------------------------------
class FrameReader:
    """Reads length-prefixed frames from a stream, asking for at least READ_SIZE bytes per
    read so that small frames do not cost one read each for header and body."""

    READ_SIZE = 65536

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = await self.stream.read(max(self.READ_SIZE, size - len(self._buffer)))
            if not chunk:
                raise EOFError("stream ended inside a frame")
            self._buffer += chunk

    async def read_frame(self) -> bytes:
        """The next frame, header included; raises EOFError if the stream ends first."""
        await self._fill(LENGTH.size)
        (length,) = LENGTH.unpack_from(self._buffer)
        await self._fill(LENGTH.size + length)
        frame = bytes(self._buffer[: LENGTH.size + length])
        del self._buffer[: LENGTH.size + length]
        return frame


async def raw_echo_server(stream: INetStream) -> None:
    """Echo length-prefixed frames until the client closes the stream."""
    reader = FrameReader(stream)
    try:
        while True:
            await stream.write(await reader.read_frame())
    except (EOFError, StreamError):
        pass
    finally:
        await stream.close()


class RawEcho:
    def __init__(self, client: IHost, server: IHost) -> None:
        self.client = client
        self.server = server
        self.reader: FrameReader | None = None

    async def connect(self) -> None:
        """Dial the server and open the one stream every round trip uses."""
        with phase("raw: hosts connected", CONNECT_SECONDS):
            await self.client.connect(peer_info(self.server))
            stream = await self.client.new_stream(self.server.get_id(), [RAW_ECHO])
        self.reader = FrameReader(stream)

    async def round_trip(self, payload: bytes) -> bytes:
        assert self.reader is not None, "connect first"
        await self.reader.stream.write(LENGTH.pack(len(payload)) + payload)
        return (await self.reader.read_frame())[LENGTH.size :]

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.stream.close()


@asynccontextmanager
async def raw_pair() -> AsyncIterator[RawEcho]:
    """Two plain py-libp2p hosts, the second serving a length-prefixed echo."""
    async with raw_host() as client, raw_host() as server:
        server.set_stream_handler(RAW_ECHO, raw_echo_server)
        side = RawEcho(client, server)
        try:
            yield side
        finally:
            await side.close()


# -- measurement ---------------------------------------------------------------------------
async def timed_round_trips(side: EchoSide, payload: bytes, count: int) -> float:
    """Seconds taken by `count` sequential round trips; checks every echo."""
    started = time.perf_counter()
    for _ in range(count):
        if await side.round_trip(payload) != payload:
            raise RuntimeError("echo returned different bytes")
    return time.perf_counter() - started


def _by_side() -> dict[str, list[float]]:
    return {"ours": [], "raw": []}


@dataclass
class Rounds:
    """Per-round figures by side; each round measures ours, then raw, back to back."""

    rtt: dict[str, list[float]] = field(default_factory=_by_side)  # round trips per second
    mb: dict[str, list[float]] = field(default_factory=_by_side)  # MB per second


def paired_ratio(figures: dict[str, list[float]]) -> float | None:
    """Median over rounds of ours/raw: a change in background load between rounds affects
    both sides of a pair alike. None before a round has both sides (a run cut short)."""
    pairs = list(zip(figures["ours"], figures["raw"], strict=False))
    return round(median([o / r for o, r in pairs]), 3) if pairs else None


async def measure(rounds: Rounds, sides: dict[str, EchoSide], args: argparse.Namespace) -> None:
    small = bytes(args.small_bytes)
    large = bytes(args.payload_kib * 1024)
    for name, side in sides.items():
        await side.connect()
        with phase(f"{name}: warm-up", args.timeout):
            await timed_round_trips(side, b"warm-up", WARMUP_ROUND_TRIPS)
    for _ in range(args.rounds):
        for name, side in sides.items():
            with phase(f"{name}: round trips", args.timeout):
                seconds = await timed_round_trips(side, small, args.requests)
            rounds.rtt[name].append(args.requests / seconds)
        for name, side in sides.items():
            with phase(f"{name}: bulk", args.timeout):
                seconds = await timed_round_trips(side, large, args.bulk)
            rounds.mb[name].append(2 * len(large) * args.bulk / seconds / 1e6)


async def run(args: argparse.Namespace) -> tuple[Rounds, str | None]:
    """Figures of all rounds, and the error (a phase past its deadline) if one occurred.
    The error is caught inside the nodes' contexts, so every node stops cleanly."""
    rounds = Rounds()
    error = None
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-rpc-") as tmp:
        async with tasknet_pair(Path(tmp)) as ours, raw_pair() as raw:
            try:
                await measure(rounds, {"ours": ours, "raw": raw}, args)
            except PhaseTimeout as exc:
                error = str(exc)
    return rounds, error


def figures(rounds: Rounds, args: argparse.Namespace) -> dict[str, Any]:
    """The report; a figure no round produced (the run was cut short) is None."""
    def middle(values: list[float], digits: int) -> float | None:
        return round(median(values), digits) if values else None

    ratio_rtt = paired_ratio(rounds.rtt)
    ratio_mb = paired_ratio(rounds.mb)
    ratio = None if ratio_rtt is None or ratio_mb is None else min(ratio_rtt, ratio_mb)
    return {
        "requests": args.requests,
        "small_bytes": args.small_bytes,
        "bulk_requests": args.bulk,
        "payload_kib": args.payload_kib,
        "rounds": args.rounds,
        "ours_rtt_per_s": middle(rounds.rtt["ours"], 1),
        "raw_rtt_per_s": middle(rounds.rtt["raw"], 1),
        "ratio_rtt": ratio_rtt,
        "ours_mb_per_s": middle(rounds.mb["ours"], 2),
        "raw_mb_per_s": middle(rounds.mb["raw"], 2),
        "ratio_mb": ratio_mb,
        "ratio": ratio,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="request/response over one stream: tasknet vs a raw py-libp2p stream")
    parser.add_argument("--requests", type=int, default=300,
                        help="small round trips per round and side")
    parser.add_argument("--small-bytes", type=int, default=64, help="small payload size")
    parser.add_argument("--bulk", type=int, default=20,
                        help="large round trips per round and side")
    parser.add_argument("--payload-kib", type=int, default=256, help="large payload size")
    parser.add_argument("--rounds", type=int, default=9,
                        help="alternating rounds per side; medians are reported")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline in seconds for each phase")
    args = parser.parse_args(argv)
    if min(args.requests, args.bulk, args.payload_kib, args.rounds) < 1 or args.small_bytes < 0:
        parser.error("counts and sizes must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    quiet_libraries()
    rounds, error = trio.run(run, args)
    return finish("rpc", figures(rounds, args), error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
