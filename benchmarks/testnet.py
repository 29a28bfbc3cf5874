# How one network scales with its size: N node.py processes (the store only, no task rounds,
# the fast membership timing of the namespace tests) each in a Linux network namespace of
# its own on one bridge (benchmarks/netlab.py; needs root and iproute2), joined through a
# testnet file naming node 0 as the bootstrap node, for N in --sizes (5, 10, 20):
#   python benchmarks/testnet.py [--sizes 5,10,20] [--idle-s 20] [--quick]
# prints one JSON line with, per N:
#   converge_s_N           from the last node's start line to every node listing every node
#                          alive (each node's /status polled through the bridge, every 0.2 s)
#   join_spread_s_p50_N, _p99_N  membership gossip delivery to all: per joining node (every
#                          node but the bootstrap one), from its start line to the first poll
#                          at which every other node lists it alive (SWIM's piggybacked
#                          dissemination of its join); nearest-rank percentiles over nodes,
#                          so at these sizes p99 is the slowest node
#   idle_bytes_per_s_per_node_N  membership bytes a node sends per second once converged
#                          (/status metrics swim_bytes_sent over --idle-s; libp2p framing and
#                          encryption not included), the mean over nodes (..._max: the most)
#   model_idle_bytes_per_s_per_node_N  the same figure from the sans-IO SWIM simulation
#                          (p2p/swim_sim.py) with the same timing, and measured_model_ratio_N
# and the model's projection model_idle_bytes_per_s_per_node_100 and _1000.
# Pubsub gossip delivery is not measured: a node subscribes to no topic but the reserved
# `members` one, which /publish refuses, and the control API has no subscribe endpoint, so
# a message published through /publish reaches no node and no receiver could report it
# (`pubsub_delivery` says so in the output).
# Every node process and every namespace (named netns_prefix<i>) is removed at the end of
# each size, also on error.
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import finish, percentile, ratio, run_steps, wait_for  # noqa: E402
from netlab import Lab  # noqa: E402

from p2p.swim import SwimConfig  # noqa: E402
from p2p.swim_sim import Simulation  # noqa: E402

NODE = str(ROOT / "node.py")
P2P_PORT, API_PORT = 4101, 8080
HEARTBEAT_S, SUSPECT_S, DEAD_S = 0.5, 2.0, 4.0
FAST = ["--heartbeat-interval", str(HEARTBEAT_S), "--suspect-after", str(SUSPECT_S),
        "--dead-after", str(DEAD_S), "--anti-entropy-interval", "1", "--no-tasks"]
PROJECT_SIZES = (100, 1000)
POLL_S = 0.2


class Node:
    """One node.py process in namespace i of the lab, its output in files under `base`."""

    def __init__(self, lab: Lab, base: Path, testnet: Path, i: int) -> None:
        self.addr = lab.addrs[i]
        self.out_path = base / f"n{i}.out"
        role = ["--bootstrap"] if i == 0 else []
        with self.out_path.open("w") as out, (base / f"n{i}.err").open("w") as err:
            self.proc = subprocess.Popen(
                [*lab.exec_prefix(i), sys.executable, NODE, "--data-dir", str(base / f"n{i}"),
                 "--testnet", str(testnet), *role,
                 "--listen", f"/ip4/{self.addr}/tcp/{P2P_PORT}",
                 "--api", f"{self.addr}:{API_PORT}", *FAST],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=base)

    def peer_id(self) -> str | None:
        for line in self.out_path.read_text().splitlines():
            if line.startswith("tasknet node ") and " listening on " in line:
                return line.split()[2]
        return None

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{self.addr}:{API_PORT}/status",
                                        timeout=3) as response:
                value: dict[str, Any] = json.loads(response.read())
                return value
        except (OSError, ValueError):
            return None

    def alive_seen(self) -> set[str]:
        status = self.status()
        return {m["peer_id"] for m in status["members"] if m["state"] == "alive"} \
            if status else set()

    def bytes_sent(self) -> int:
        return int((self.status() or {}).get("metrics", {}).get("swim_bytes_sent", 0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def model_bytes_per_s(n: int, idle_periods: float = 20.0) -> float:
    """Idle membership bytes a node sends per second in the SWIM simulation of a converged
    network of n nodes, with the benchmark's timing (as p2p.network.swim_config makes it)."""
    config = SwimConfig(period=HEARTBEAT_S, probe_timeout=HEARTBEAT_S / 2,
                        suspicion_floor=max(1.0, DEAD_S - SUSPECT_S))
    sim = Simulation(n, seed=1, config=config)
    sim.run(idle_periods * sim.period)
    return sim.total_bytes() / (n * idle_periods * sim.period)


def measure(n: int, idle_s: float, timeout: float, out: dict[str, Any]) -> None:
    lab = Lab(n)
    nodes: list[Node] = []
    with tempfile.TemporaryDirectory(prefix="tasknet-testnet-") as tmp:
        try:
            lab.create()
            base = Path(tmp)
            testnet = base / "testnet.toml"
            testnet.write_text(
                f'network_id = "tasknet-bench-{lab.octet}"\nbootstrap = []\n\n'
                f'[bootstrap_node]\ndata_dir = "{base / "n0"}"\n'
                f'listen = "/ip4/{lab.addrs[0]}/tcp/{P2P_PORT}"\n')
            nodes.append(Node(lab, base, testnet, 0))
            wait_for(nodes[0].peer_id, 60, "the bootstrap node's start line", POLL_S)
            for i in range(1, n):
                nodes.append(Node(lab, base, testnet, i))
            announced: dict[int, float] = {}

            def all_announced() -> bool:
                for i, node in enumerate(nodes):
                    if i not in announced and node.peer_id():
                        announced[i] = time.monotonic()
                return len(announced) == n

            wait_for(all_announced, 120, f"all {n} start lines", 0.05)
            ids = [node.peer_id() or "" for node in nodes]
            last_start = max(announced.values())
            spread: dict[int, float] = {}

            def converged() -> bool:
                seen = [node.alive_seen() for node in nodes]
                now = time.monotonic()
                for j in range(1, n):
                    if j not in spread and all(ids[j] in s for i, s in enumerate(seen)
                                               if i != j):
                        spread[j] = now - announced[j]
                return all(set(ids) <= s for s in seen)

            wait_for(converged, timeout, f"all {n} nodes to see all alive", POLL_S)
            out[f"converge_s_{n}"] = round(time.monotonic() - last_start, 2)
            times = list(spread.values())
            out[f"join_spread_s_p50_{n}"] = round(percentile(times, 50), 2)
            out[f"join_spread_s_p99_{n}"] = round(percentile(times, 99), 2)
            sent0 = [node.bytes_sent() for node in nodes]
            started = time.monotonic()
            time.sleep(idle_s)  # the idle window itself, not a wait for a condition
            elapsed = time.monotonic() - started
            rates = [(node.bytes_sent() - b) / elapsed
                     for node, b in zip(nodes, sent0, strict=True)]
            measured = statistics.mean(rates)
            out[f"idle_bytes_per_s_per_node_{n}"] = round(measured, 1)
            out[f"idle_bytes_per_s_per_node_{n}_max"] = round(max(rates), 1)
            model = model_bytes_per_s(n)
            out[f"model_idle_bytes_per_s_per_node_{n}"] = round(model, 1)
            out[f"measured_model_ratio_{n}"] = ratio(measured, model)
        finally:
            for node in nodes:
                node.stop()
            lab.teardown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="node.py processes in network namespaces: convergence, membership "
                    "gossip spread and idle membership bytes as N grows, with the SWIM "
                    "model's projection to 100 and 1,000 nodes")
    parser.add_argument("--sizes", default="5,10,20",
                        help="comma-separated network sizes (default 5,10,20)")
    parser.add_argument("--idle-s", type=float, default=20.0,
                        help="seconds of idle traffic measured per size (default 20)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5 s idle window, a shorter convergence deadline")
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes numbers separated by commas, not {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 2:
        parser.error("--sizes needs network sizes of at least 2 nodes")
    if args.quick:
        args.idle_s = min(args.idle_s, 5.0)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    timeout = 60.0 if args.quick else 300.0
    figures: dict[str, Any] = {
        "bench": "testnet", "sizes": args.size_list, "idle_s": args.idle_s,
        "heartbeat_s": HEARTBEAT_S, "netns_prefix": Lab(1).names[0][:-1],
        "pubsub_delivery": "not measured: no node subscribes to a topic /publish accepts, "
                           "and the API has no subscribe endpoint",
    }
    def size(n: int) -> Callable[[], None]:
        return lambda: measure(n, args.idle_s, timeout, figures)

    steps = [(f"nodes_{n}", size(n)) for n in args.size_list]

    def project() -> None:
        for n in PROJECT_SIZES:
            figures[f"model_idle_bytes_per_s_per_node_{n}"] = round(model_bytes_per_s(n), 1)

    steps.append(("model_projection", project))
    return finish("testnet", figures, run_steps(steps))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
