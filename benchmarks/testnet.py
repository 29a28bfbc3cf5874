# How one network scales with its size: N node.py processes (the store only, no task rounds,
# the fast membership timing of the namespace tests) each in a Linux network namespace of
# its own on one bridge (benchmarks/netlab.py; needs root and iproute2), joined through a
# testnet file naming node 0 as the bootstrap node, for N in --sizes (5, 10, 20):
#   python benchmarks/testnet.py [--sizes 5,10,20] [--idle-s 20] [--messages 20]
#                                [--spacing-s 0.25] [--quick]
# prints one JSON line with, per N:
#   converge_s_N           from the last node's start line to every node listing every node
#                          alive (each node's /status polled through the bridge, every 0.2 s)
#   join_spread_s_p50_N, _p99_N  membership gossip delivery to all: per joining node (every
#                          node but the bootstrap one), from its start line to the first poll
#                          at which every other node lists it alive (SWIM's piggybacked
#                          dissemination of its join); nearest-rank percentiles over nodes,
#                          so at these sizes p99 is the slowest node
#   idle_settle_s_N        from convergence until every node's piggyback queue is empty
#                          (/status metrics swim_pending_updates: the joins' news has gone
#                          out its mult*log10(N) times); the idle window starts then
#   idle_bytes_per_s_per_node_N  membership bytes a node sends per second at idle
#                          (/status metrics swim_bytes_sent over --idle-s; libp2p framing and
#                          encryption not included), the mean over nodes (..._max: the most);
#                          idle_bytes_by_kind_N the mean per message kind (swim_bytes_sent_
#                          <kind>: ping, ack, sync, sync_hashes, ...; `carried`: of those, the
#                          bytes of piggybacked updates and entries, none at idle)
#   idle_wire_bytes_per_s_per_node_N  what a node sends on the wire per second in the same
#                          window: its eth0's tx bytes (the kernel's counters, read with
#                          `ip -s -j link` in its namespace at the window's ends), the mean
#                          over nodes (..._max: the most); everything the node process sends
#                          at idle: Ethernet, IP and TCP headers and bare ACKs, Noise
#                          encryption and yamux framing around every stream's data, the
#                          SWIM messages, pubsub heartbeats and gossip control, yamux and
#                          libp2p keep-alive pings, the store's anti-entropy rounds (every
#                          --anti-entropy-s, 1 s by default); ARP and the like add a few
#                          packets a minute, negligible.
#                          idle_wire_packets_per_s_per_node_N the mean tx packets/s,
#                          idle_wire_rx_bytes_per_s_per_node_N the mean rx bytes/s, and
#                          wire_to_swim_ratio_N the nodes' tx bytes over their swim_bytes_sent
#                          (rates over the window: the /status readings of the swim counters
#                          bracket the counter readings, so their HTTP is not on the wire
#                          figure)
#   model_idle_bytes_per_s_per_node_N  the same figure from the sans-IO SWIM simulation
#                          (p2p/swim_sim.py measure_idle: the same core, encoder and timing,
#                          a converged network over four push-pull intervals), per kind in
#                          model_idle_bytes_by_kind_N, and measured_model_ratio_N
#   gossip_p50_ms_N, _p99_N  pubsub gossip delivery to all: after the idle window every node
#                          subscribes to a bench topic (POST /subscribe), probes from varying
#                          origins wait for the mesh (gossip_mesh_s_N: from the subscriptions
#                          to the last of 3 consecutive probes that reached every node), then
#                          --messages messages are published (POST /publish) --spacing-s
#                          apart, origin k mod N, each payload carrying its publish wall time
#                          (taken just before the request); every node's receive wall time
#                          comes from its GET /gossip (the nodes share one clock). Per message
#                          the time until the last other node had it; nearest-rank
#                          percentiles over the messages delivered to all
#   gossip_node_p50_ms_N, _p99_N  the same per (message, receiving node) pair
#   gossip_delivered_share_N  the share of (message, other node) pairs delivered within
#                          GOSSIP_WAIT_S of the last publish (gossip_all_share_N: of messages
#                          that reached every node)
#   api_rtt_ms_N           the reference: the median round trip of one small HTTP request
#                          from this process to a node through the bridge (a hop's floor:
#                          one loopback-speed exchange with a node process, no libp2p)
# and the model's projection model_idle_bytes_per_s_per_node_100 and _1000. At idle a node
# sends one ping and one ack per period (6 bytes each: a 3-byte sequence number) and, every
# sync interval (15 s, jittered), one root-hash Sync (14 bytes) and one empty SyncHashes
# answer (7 bytes): (12 / period + 21 / 15) B/s, ~25.4 at this 0.5 s period, the same at any
# N. What grows with N is churn, not idle: every node that hears a join (an alive update of
# ~300 bytes with one address) sends it on 4*ceil(log10(N+1)) times, so a join costs each
# node ~1.2 kB at N <= 9, ~2.4 kB up to 99, ~3.6 kB up to 999 (the window before
# idle_settle_s_N holds that for the N joins of the start).
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
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import finish, percentile, ratio, run_steps, wait_for  # noqa: E402
from netlab import Lab, LinkCounters  # noqa: E402

from p2p.config import NetworkConfig  # noqa: E402
from p2p.network import swim_config  # noqa: E402
from p2p.swim import KIND  # noqa: E402
from p2p.swim_sim import IdleFigures, measure_idle  # noqa: E402

NODE = str(ROOT / "node.py")
P2P_PORT, API_PORT = 4101, 8080
HEARTBEAT_S, SUSPECT_S, DEAD_S = 0.5, 2.0, 4.0
FAST = ["--heartbeat-interval", str(HEARTBEAT_S), "--suspect-after", str(SUSPECT_S),
        "--dead-after", str(DEAD_S), "--no-tasks"]
ANTI_ENTROPY_S = 1.0  # --anti-entropy-s: the store's anti-entropy rounds (a node's default: 10)
PROJECT_SIZES = (100, 1000)
POLL_S = 0.2
TOPIC = "bench"
MESH_PROBES = 3  # consecutive probes (from different origins) that reached every node
PROBE_WAIT_S = 2.0  # how long one probe may take to reach every node
GOSSIP_WAIT_S = 15.0  # after the last publish, for every message to reach every node


class Node:
    """One node.py process in namespace i of the lab, its output in files under `base`."""

    def __init__(self, lab: Lab, base: Path, testnet: Path, i: int,
                 anti_entropy_s: float = ANTI_ENTROPY_S) -> None:
        self.addr = lab.addrs[i]
        self.out_path = base / f"n{i}.out"
        role = ["--bootstrap"] if i == 0 else []
        with self.out_path.open("w") as out, (base / f"n{i}.err").open("w") as err:
            self.proc = subprocess.Popen(
                [*lab.exec_prefix(i), sys.executable, NODE, "--data-dir", str(base / f"n{i}"),
                 "--testnet", str(testnet), *role,
                 "--listen", f"/ip4/{self.addr}/tcp/{P2P_PORT}",
                 "--api", f"{self.addr}:{API_PORT}", *FAST,
                 "--anti-entropy-interval", repr(anti_entropy_s)],
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

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, JSON answer) of one control API request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.addr}:{API_PORT}{path}", data=data, method=method,
            headers={"content-type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def gossip(self, since: int) -> list[dict[str, Any]]:
        """The bench topic's records numbered after `since`."""
        status, answer = self.call("GET", f"/gossip?topic={TOPIC}&since={since}")
        if status != 200:
            raise RuntimeError(f"GET /gossip of {self.addr}: {status} {answer}")
        records: list[dict[str, Any]] = answer["records"]
        return records

    def publish(self, payload: Any) -> None:
        status, answer = self.call("POST", "/publish", {"topic": TOPIC, "payload": payload})
        if status != 200:
            raise RuntimeError(f"POST /publish to {self.addr}: {status} {answer}")

    def swim_metrics(self) -> dict[str, int]:
        """The node's membership counters (/status metrics swim_*; {} when it does not
        answer)."""
        metrics = (self.status() or {}).get("metrics", {})
        return {key: int(value) for key, value in metrics.items() if key.startswith("swim_")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def model_idle(n: int) -> IdleFigures:
    """Idle membership traffic a node sends per second in the SWIM simulation of a converged
    network of n nodes, with the benchmark's timing (as p2p.network.swim_config makes it)."""
    config = swim_config(NetworkConfig(data_dir=Path("unused"), heartbeat_interval=HEARTBEAT_S,
                                       suspect_after=SUSPECT_S, dead_after=DEAD_S))
    return measure_idle(n, config=config)


def kind_rates(before: list[dict[str, int]], after: list[dict[str, int]],
               seconds: float) -> tuple[list[float], dict[str, float]]:
    """From two readings of every node's swim metrics: each node's bytes sent per second,
    and the mean per node per message kind (kinds sent at all, and `carried`: the bytes of
    the updates and entries in them)."""
    pairs = list(zip(before, after, strict=True))
    rates = [(b.get("swim_bytes_sent", 0) - a.get("swim_bytes_sent", 0)) / seconds
             for a, b in pairs]
    names = {f"swim_bytes_sent_{kind}": kind for kind in KIND.values()}
    names["swim_carried_bytes_sent"] = "carried"
    kinds = {}
    for key, kind in names.items():
        total = sum(b.get(key, 0) - a.get(key, 0) for a, b in pairs)
        if total:
            kinds[kind] = round(total / (len(pairs) * seconds), 1)
    return rates, kinds


def wire_reading(lab: Lab) -> list[tuple[float, LinkCounters]]:
    """Every node's eth0 counters, each with the moment it was read (the middle of its
    `ip` call)."""
    readings = []
    for i in range(lab.size):
        started = time.monotonic()
        counters = lab.counters(i)
        readings.append(((started + time.monotonic()) / 2, counters))
    return readings


def wire_rates(before: list[tuple[float, LinkCounters]],
               after: list[tuple[float, LinkCounters]]) -> dict[str, list[float]]:
    """Per node, from two readings: tx bytes, tx packets and rx bytes per second."""
    rates: dict[str, list[float]] = {"tx_bytes": [], "tx_packets": [], "rx_bytes": []}
    for (t0, a), (t1, b) in zip(before, after, strict=True):
        seconds = t1 - t0
        rates["tx_bytes"].append((b.tx_bytes - a.tx_bytes) / seconds)
        rates["tx_packets"].append((b.tx_packets - a.tx_packets) / seconds)
        rates["rx_bytes"].append((b.rx_bytes - a.rx_bytes) / seconds)
    return rates


class GossipLog:
    """What every node received on the bench topic, read incrementally."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.cursors = [0] * len(nodes)
        self.payloads: list[list[tuple[dict[str, Any], float]]] = [[] for _ in nodes]

    def poll(self) -> None:
        for i, node in enumerate(self.nodes):
            for record in node.gossip(self.cursors[i]):
                self.cursors[i] = record["seq"]
                if isinstance(record.get("payload"), dict):
                    self.payloads[i].append((record["payload"], record["received_ms"]))

    def received(self, key: str, value: int) -> list[dict[int, float]]:
        """Per node: receive wall time (ms) of each message whose payload[key] is given,
        by that number (only `value` when not negative)."""
        return [{p[key]: at for p, at in got if key in p and (value < 0 or p[key] == value)}
                for got in self.payloads]


def measure_gossip(nodes: list[Node], messages: int, spacing_s: float,
                   out: dict[str, Any]) -> None:
    n = len(nodes)
    subscribed = time.monotonic()
    for node in nodes:
        status, answer = node.call("POST", "/subscribe", {"topic": TOPIC})
        if status != 200:
            raise RuntimeError(f"POST /subscribe to {node.addr}: {status} {answer}")
    rtts = []
    for _ in range(20):
        started = time.perf_counter()
        nodes[0].gossip(0)  # nothing received yet: a small answer
        rtts.append((time.perf_counter() - started) * 1000)
    out[f"api_rtt_ms_{n}"] = round(statistics.median(rtts), 2)
    log = GossipLog(nodes)
    probe = 0
    streak = 0

    def mesh_formed() -> bool:
        nonlocal probe, streak
        probe += 1
        nodes[probe % n].publish({"probe": probe})
        deadline = time.monotonic() + PROBE_WAIT_S
        while time.monotonic() < deadline:
            log.poll()
            if all(got for got in log.received("probe", probe)):
                streak += 1
                return streak >= MESH_PROBES
            time.sleep(0.05)
        streak = 0
        return False

    wait_for(mesh_formed, 120, "the bench topic's mesh to reach every node", 0)
    out[f"gossip_mesh_s_{n}"] = round(time.monotonic() - subscribed, 2)
    origins: dict[int, int] = {}
    sent_ms: dict[int, float] = {}
    for k in range(messages):
        origins[k] = k % n
        sent_ms[k] = time.time() * 1000
        nodes[k % n].publish({"bench": k, "sent_ms": sent_ms[k]})
        time.sleep(spacing_s)  # the spacing between publishes, not a wait for a condition

    def everyone_has_everything() -> bool:
        log.poll()
        got = log.received("bench", -1)
        return all(len(got[j]) == messages for j in range(n))

    try:
        wait_for(everyone_has_everything, GOSSIP_WAIT_S, "every message at every node", POLL_S)
    except TimeoutError:
        pass  # the share delivered says how many did not arrive
    got = log.received("bench", -1)
    pairs, to_all = [], []
    for k in range(messages):
        delays = [got[j][k] - sent_ms[k] for j in range(n) if j != origins[k] and k in got[j]]
        pairs += delays
        if len(delays) == n - 1:
            to_all.append(max(delays))
    expected = messages * (n - 1)
    out[f"gossip_messages_{n}"] = messages
    out[f"gossip_delivered_share_{n}"] = round(len(pairs) / expected, 4)
    out[f"gossip_all_share_{n}"] = round(len(to_all) / messages, 4)
    if to_all:
        out[f"gossip_p50_ms_{n}"] = round(percentile(to_all, 50), 1)
        out[f"gossip_p99_ms_{n}"] = round(percentile(to_all, 99), 1)
    if pairs:
        out[f"gossip_node_p50_ms_{n}"] = round(percentile(pairs, 50), 1)
        out[f"gossip_node_p99_ms_{n}"] = round(percentile(pairs, 99), 1)


def measure(n: int, idle_s: float, timeout: float, out: dict[str, Any],
            messages: int, spacing_s: float, anti_entropy_s: float = ANTI_ENTROPY_S) -> None:
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
            nodes.append(Node(lab, base, testnet, 0, anti_entropy_s))
            wait_for(nodes[0].peer_id, 60, "the bootstrap node's start line", POLL_S)
            for i in range(1, n):
                nodes.append(Node(lab, base, testnet, i, anti_entropy_s))
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
            # idle: once the joins' news has been sent its retransmissions (every node's
            # piggyback queue empty), so the window holds no dissemination, only upkeep
            converged_at = time.monotonic()
            wait_for(lambda: all(node.swim_metrics().get("swim_pending_updates", 1) == 0
                                 for node in nodes), timeout,
                     f"all {n} nodes' membership news to settle", POLL_S)
            out[f"idle_settle_s_{n}"] = round(time.monotonic() - converged_at, 2)
            before = [node.swim_metrics() for node in nodes]
            started = time.monotonic()
            wire_before = wire_reading(lab)
            time.sleep(idle_s)  # the idle window itself, not a wait for a condition
            wire = wire_rates(wire_before, wire_reading(lab))
            elapsed = time.monotonic() - started
            rates, kinds = kind_rates(before, [node.swim_metrics() for node in nodes], elapsed)
            measured = statistics.mean(rates)
            out[f"idle_bytes_per_s_per_node_{n}"] = round(measured, 1)
            out[f"idle_bytes_per_s_per_node_{n}_max"] = round(max(rates), 1)
            out[f"idle_bytes_by_kind_{n}"] = kinds
            wire_tx = statistics.mean(wire["tx_bytes"])
            out[f"idle_wire_bytes_per_s_per_node_{n}"] = round(wire_tx, 1)
            out[f"idle_wire_bytes_per_s_per_node_{n}_max"] = round(max(wire["tx_bytes"]), 1)
            out[f"idle_wire_packets_per_s_per_node_{n}"] = round(
                statistics.mean(wire["tx_packets"]), 2)
            out[f"idle_wire_rx_bytes_per_s_per_node_{n}"] = round(
                statistics.mean(wire["rx_bytes"]), 1)
            out[f"wire_to_swim_ratio_{n}"] = ratio(wire_tx, measured)
            model = model_idle(n)
            out[f"model_idle_bytes_per_s_per_node_{n}"] = round(model.bytes_per_s, 1)
            out[f"model_idle_bytes_by_kind_{n}"] = {
                kind: round(rate, 1) for kind, rate in model.kind_bytes_per_s.items()}
            out[f"measured_model_ratio_{n}"] = ratio(measured, model.bytes_per_s)
            measure_gossip(nodes, messages, spacing_s, out)
        finally:
            for node in nodes:
                node.stop()
            lab.teardown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="node.py processes in network namespaces: convergence, membership "
                    "gossip spread, idle membership and wire bytes and pubsub gossip delivery "
                    "to all nodes as N grows, with the SWIM model's projection to 100 and "
                    "1,000 nodes")
    parser.add_argument("--sizes", default="5,10,20",
                        help="comma-separated network sizes (default 5,10,20)")
    parser.add_argument("--idle-s", type=float, default=20.0,
                        help="seconds of idle traffic measured per size (default 20)")
    parser.add_argument("--messages", type=int, default=20,
                        help="gossip messages published per size (default 20)")
    parser.add_argument("--spacing-s", type=float, default=0.25,
                        help="seconds between two published messages (default 0.25)")
    parser.add_argument("--anti-entropy-s", type=float, default=ANTI_ENTROPY_S,
                        help="the nodes' anti-entropy interval in seconds (default 1; a "
                             "node's own default is 10): part of the idle wire traffic")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5 s idle window, 10 messages, a shorter "
                             "convergence deadline")
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes numbers separated by commas, not {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 2:
        parser.error("--sizes needs network sizes of at least 2 nodes")
    if args.messages < 1 or args.spacing_s < 0:
        parser.error("--messages needs at least 1 and --spacing-s no negative number")
    if args.quick:
        args.idle_s = min(args.idle_s, 5.0)
        args.messages = min(args.messages, 10)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    timeout = 60.0 if args.quick else 300.0
    figures: dict[str, Any] = {
        "bench": "testnet", "sizes": args.size_list, "idle_s": args.idle_s,
        "heartbeat_s": HEARTBEAT_S, "netns_prefix": Lab(1).names[0][:-1],
        "gossip_spacing_s": args.spacing_s, "anti_entropy_s": args.anti_entropy_s,
    }

    def size(n: int) -> Callable[[], None]:
        return lambda: measure(n, args.idle_s, timeout, figures, args.messages, args.spacing_s,
                              args.anti_entropy_s)

    steps = [(f"nodes_{n}", size(n)) for n in args.size_list]

    def project() -> None:
        for n in PROJECT_SIZES:
            figures[f"model_idle_bytes_per_s_per_node_{n}"] = round(model_idle(n).bytes_per_s,
                                                                     1)

    steps.append(("model_projection", project))
    return finish("testnet", figures, run_steps(steps))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
