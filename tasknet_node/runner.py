# Running a node process: the p2p network, the control API, the data-dir files and the
# progress lines, all in one trio nursery, until SIGINT or SIGTERM cancels it.
# Lives here: the node's lifecycle and the extension hook other packages plug into.
# Must not live here: argument parsing (cli.py), endpoints (api.py), p2p protocol logic (p2p).
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import trio

from p2p import MemberEvent, MemberState, Network, NetworkConfig

from . import datadir
from .api import ControlApi, bind_socket, is_loopback, serve_api
from .gcpolicy import GcWatch, freeze_startup_objects
from .gossipwatch import watch_gossip
from .procstats import ProcessFigures

NodeExtension = Callable[[Network, ControlApi], AbstractAsyncContextManager[object]]
"""A package's part of a node: entered once the network runs and before the control API
serves, so it can open its storage, register routes and metrics on the `ControlApi`, and run
background tasks (in a nursery of its own) until the node stops and the context exits."""

Say = Callable[[str], None]


@dataclass
class NodeOptions:
    network: NetworkConfig
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0: any free port; the chosen one is written to DATA_DIR/api.json


def print_line(line: str) -> None:
    print(line, flush=True)


async def run_node(
    options: NodeOptions,
    *,
    extensions: Sequence[NodeExtension] = (),
    say: Say = print_line,
    stop_grace: float = 1.5,
) -> None:
    """Run a node until SIGINT or SIGTERM, then stop it. If stopping takes longer than
    `stop_grace` seconds, the process exits anyway (exit code 1): a node must never hang on
    its way down. Must run in the main thread (it handles signals)."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, stop, stop_grace,
                               options.network.data_dir, say)
            await _run(options, extensions, say, stop)
            nursery.cancel_scope.cancel()


async def _stop_on_signal(
    signals: AsyncIterator[int], stop: trio.Event, grace: float, data_dir: Path, say: Say,
) -> None:
    async for signum in signals:
        say(f"stopping ({signal.Signals(signum).name})")
        stop.set()
        break
    # cancelled as soon as the node has stopped; meanwhile more signals (a second Ctrl-C, a
    # supervisor's SIGTERM after the terminal's SIGINT) are taken here, not redelivered later
    with trio.move_on_after(grace):
        async for signum in signals:
            say(f"already stopping ({signal.Signals(signum).name})")
    print(f"node did not stop within {grace}s; exiting anyway", file=sys.stderr, flush=True)
    datadir.remove_api_info(data_dir)
    os._exit(1)


async def _run(
    options: NodeOptions, extensions: Sequence[NodeExtension], say: Say, stop: trio.Event
) -> None:
    # The node stops by leaving these contexts normally once `stop` is set, not by being
    # cancelled: a cancelled p2p network could not send its leave announcement any more.
    config = options.network
    datadir.prepare(config.data_dir)
    with datadir.locked(config.data_dir), GcWatch() as gc_watch, \
            bind_socket(options.api_host, options.api_port) as sock:
        api_host, api_port = sock.getsockname()[:2]
        async with Network.start(config) as net, net.member_events() as events:
            api = ControlApi(net)
            api.add_status("gc", gc_watch.status)
            api.add_metrics(gc_watch.metrics)
            process = ProcessFigures()
            api.add_status("process", process.status)
            api.add_metrics(process.metrics)
            async with AsyncExitStack() as stack:
                for extension in (watch_gossip, *extensions):
                    await stack.enter_async_context(extension(net, api))
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_api, api, sock)
                    freeze_startup_objects()  # see gcpolicy.py: once, all startup is done
                    info = datadir.ApiInfo(api_host, api_port, os.getpid())
                    datadir.write_node_info(config.data_dir, net.peer_id, config.network_id,
                                            net.addrs)
                    datadir.write_api_info(config.data_dir, info)
                    try:
                        _announce(net, info, say)
                        nursery.start_soon(_report_members, net, events, say)
                        nursery.start_soon(_return_free_memory)
                        await stop.wait()
                    finally:
                        datadir.remove_api_info(config.data_dir)
                        nursery.cancel_scope.cancel()


def _announce(net: Network, api: datadir.ApiInfo, say: Say) -> None:
    addrs = net.addrs
    say(f"tasknet node {net.peer_id} listening on {addrs[0] if addrs else '(nothing)'}")
    for addr in addrs[1:]:
        say(f"also listening on {addr}")
    say(f"api {api.url}")
    config = net.config
    joining = (f"joining {len(config.bootstrap)} bootstrap address(es)" if config.bootstrap
               else "waiting for others to join")
    say(f"network {config.network_id}, data dir {config.data_dir}, {joining}")
    if not is_loopback(api.host):
        print(f"warning: the control API on {api.host} has no authentication and is reachable "
              "from other machines", file=sys.stderr, flush=True)


async def _report_members(
    net: Network, events: trio.MemoryReceiveChannel[MemberEvent], say: Say
) -> None:
    async for event in events:
        alive = sum(1 for m in net.members() if m.state is MemberState.ALIVE)
        say(f"member {event.peer_id} {describe_member_event(event)} ({alive} alive)")


def describe_member_event(event: MemberEvent) -> str:
    if event.current is None:
        return "forgotten"
    if event.current is MemberState.ALIVE:
        if event.previous is None:
            return "joined"
        return "restarted" if event.restarted else "alive again"
    if event.current is MemberState.DEAD and event.member.left:
        return "left"
    return event.current.value


MEMORY_TRIM_INTERVAL_S = 10.0


async def _return_free_memory() -> None:
    """Every few seconds, hand the C heap's free pages back to the system (glibc keeps what
    bursts of work freed, such as a handoff's or a load's batches, as resident memory)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    while True:
        await trio.sleep(MEMORY_TRIM_INTERVAL_S)
        trim(0)
