# The real-process half of benchmarks/membership.py: N node.py processes (the store only, no
# task rounds) on 127.0.0.1 of this machine. Used by membership.py; runs alone too:
#   .venv/bin/python benchmarks/membership_nodes.py [--nodes 30] [--idle-s 20]
# prints one JSON line with:
#   converge_s_N             from the last node's start line to every node seeing every node
#                            alive (polled through each node's /status every 0.5 s)
#   idle_cpu_pct_per_node_N  each node's CPU (/proc/<pid>/stat user + system) over --idle-s
#                            seconds after convergence, as % of one core; the mean over nodes
#                            (..._max: the busiest node)
#   idle_bytes_per_s_per_node_N  membership bytes a node sent per second over the same window
#                            (the swim protocol's messages, from /status metrics swim_bytes_sent;
#                            libp2p framing and encryption not included)
#   detect_dead_s_N          from SIGKILL of one node to every other node reporting it dead
#   false_dead_N             members other than the killed one that any node reported dead
# Every node process is stopped at the end, also on error.
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import wait_for  # noqa: E402

from tasknet_node.datadir import DataDirError, read_api_info  # noqa: E402
from tasknet_node.procstats import parse_cpu_seconds  # noqa: E402

NODE = str(ROOT / "node.py")
ANNOUNCE = re.compile(r"^tasknet node (\S+) listening on (\S+)$", re.M)
TICKS = os.sysconf("SC_CLK_TCK")


class Node:
    def __init__(self, base: Path, name: str, args: list[str]) -> None:
        self.data_dir = base / name
        self.out = (base / f"{name}.out").open("w")
        self.proc = subprocess.Popen([sys.executable, NODE, "--data-dir", str(self.data_dir),
                                      *args], stdout=self.out, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, cwd=base)
        self.out_path = base / f"{name}.out"

    def announced(self) -> tuple[str, str] | None:
        match = ANNOUNCE.search(self.out_path.read_text())
        return (match.group(1), match.group(2)) if match else None

    def status(self) -> dict[str, Any] | None:
        try:
            url = read_api_info(self.data_dir).url + "/status"
            with urllib.request.urlopen(url, timeout=5) as response:
                value: dict[str, Any] = json.loads(response.read())
                return value
        except (DataDirError, OSError, ValueError):
            return None

    def states(self) -> dict[str, str]:
        status = self.status()
        return {m["peer_id"]: m["state"] for m in status["members"]} if status else {}

    def cpu_s(self) -> float:
        return parse_cpu_seconds(Path(f"/proc/{self.proc.pid}/stat").read_text(), TICKS)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def measure(n: int, idle_s: float, converge_timeout: float = 300.0) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    common = ["--no-tasks", "--heartbeat-interval", "1"]
    with tempfile.TemporaryDirectory(prefix="tasknet-membership-") as tmp:
        base = Path(tmp)
        nodes: list[Node] = []
        try:
            boot = Node(base, "n0", ["--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
                                     *common])
            nodes.append(boot)
            _, addr = wait_for(boot.announced, 60, "the bootstrap node", 0.1)
            nodes += [Node(base, f"n{i}", ["--join", addr, *common]) for i in range(1, n)]
            ids = [wait_for(node.announced, 120, f"node {i}", 0.1)[0]
                   for i, node in enumerate(nodes)]
            everyone = set(ids)
            started = time.monotonic()

            def converged() -> bool:
                return all(all(s.get(p) == "alive" for p in everyone)
                           for s in (node.states() for node in nodes))

            wait_for(converged, converge_timeout, f"all {n} nodes to see all alive")
            figures[f"converge_s_{n}"] = round(time.monotonic() - started, 1)
            cpu0 = [node.cpu_s() for node in nodes]
            bytes0 = [(node.status() or {}).get("metrics", {}).get("swim_bytes_sent", 0)
                      for node in nodes]
            t0 = time.monotonic()
            time.sleep(idle_s)
            elapsed = time.monotonic() - t0
            cpu = [(node.cpu_s() - c) / elapsed * 100 for node, c in zip(nodes, cpu0,
                                                                          strict=True)]
            sent = [((node.status() or {}).get("metrics", {}).get("swim_bytes_sent", 0) - b)
                    / elapsed for node, b in zip(nodes, bytes0, strict=True)]
            figures[f"idle_cpu_pct_per_node_{n}"] = round(sum(cpu) / n, 2)
            figures[f"idle_cpu_pct_per_node_{n}_max"] = round(max(cpu), 2)
            figures[f"idle_bytes_per_s_per_node_{n}"] = round(sum(sent) / n, 1)
            victim, victim_id = nodes[n // 2], ids[n // 2]
            victim.stop(signal.SIGKILL)
            killed = time.monotonic()
            survivors = [node for node in nodes if node is not victim]
            wait_for(lambda: all(node.states().get(victim_id) == "dead"
                                 for node in survivors), 300, "every node to see the kill")
            figures[f"detect_dead_s_{n}"] = round(time.monotonic() - killed, 1)
            figures[f"false_dead_{n}"] = len({p for node in survivors
                                              for p, st in node.states().items()
                                              if st == "dead" and p != victim_id})
        finally:
            for node in nodes:
                node.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--idle-s", type=float, default=20.0)
    args = parser.parse_args()
    try:
        figures = measure(args.nodes, args.idle_s)
    except TimeoutError as exc:
        print(json.dumps({"bench": "membership_nodes", "error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"bench": "membership_nodes", **figures}, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
