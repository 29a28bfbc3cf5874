# System tests of `node.py` processes each in its own Linux network namespace (no loopback
# between nodes: each listens on its namespace's address and they join through a testnet
# file naming the bootstrap node), and a Jepsen-style fault test: 5 nodes under concurrent
# writes of unique values and counter increments while a nemesis kills -9 and restarts a
# node, pauses one with SIGSTOP, splits the network 3/2, isolates a node and cuts a link one
# way; after healing, a checker asks every replica's own store: every acknowledged write is
# there with its value, the replicas agree, and each counter lies within [acknowledged,
# acknowledged + unknown] increments. Needs root and iproute2; fails (never skips) without.
# Namespaces, links and processes are removed in fixture teardown whatever happens.
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from netns_helpers import Lab, lab_fixture, udp_reaches

from process_helpers import (
    JsonApi,
    NodeProcess,
    Processes,
    processes_fixture,
    wait_for,
    wait_for_everyone,
)

P2P_PORT = 4101
API_PORT = 8080
FAST = ["--heartbeat-interval", "0.5", "--suspect-after", "2", "--dead-after", "4",
        "--anti-entropy-interval", "1", "--no-tasks"]


def Api(host: str, timeout: float) -> JsonApi:  # noqa: N802 (reads as the class it makes)
    """The API of the node at `host` in the lab (its fixed API port)."""
    return JsonApi((host, API_PORT), timeout)


# tests ask for the lab before `processes`: pytest tears fixtures down in reverse, so the
# nodes are killed before their namespaces are deleted
lab3 = lab_fixture(3)
lab5 = lab_fixture(5)
processes = processes_fixture(NodeProcess)


def write_testnet(lab: Lab, base: Path) -> Path:
    path = base / "netns.toml"
    path.write_text(
        f'network_id = "tasknet-netns-{lab.octet}"\nbootstrap = []\n\n[bootstrap_node]\n'
        f'data_dir = "{base / "n0"}"\nlisten = "/ip4/{lab.addrs[0]}/tcp/{P2P_PORT}"\n')
    return path


def start_node(processes: Processes, lab: Lab, testnet: Path, i: int,
               name: str | None = None) -> NodeProcess:
    """Node i in its namespace, listening (p2p and API) on its namespace address only."""
    role = ["--bootstrap"] if i == 0 else []
    node: NodeProcess = processes.node(
        name or f"n{i}", "--testnet", str(testnet), *role,
        "--listen", f"/ip4/{lab.addrs[i]}/tcp/{P2P_PORT}",
        "--api", f"{lab.addrs[i]}:{API_PORT}", *FAST,
        data_dir=processes.base / f"n{i}", prefix=lab.exec_prefix(i))
    return node


def start_network(processes: Processes, lab: Lab) -> tuple[list[NodeProcess], Path]:
    testnet = write_testnet(lab, processes.base)
    boot = start_node(processes, lab, testnet, 0)
    wait_for(boot.peer_id, 30, f"the bootstrap node's start line ({boot.err})")
    nodes = [boot] + [start_node(processes, lab, testnet, i) for i in range(1, lab.size)]
    wait_for(lambda: all(n.peer_id() for n in nodes), 30, "every node's start line")
    wait_for_everyone(nodes, 40)
    return nodes, testnet


def assert_namespace_addresses(nodes: list[NodeProcess], lab: Lab) -> None:
    """Each node advertises its namespace address only, and every other node knows it by
    that address: nothing goes through loopback."""
    by_id = {n.peer_id(): lab.addrs[i] for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        status = node.status()
        assert status is not None
        announced = node.announced()
        assert announced and announced[1].startswith(f"/ip4/{lab.addrs[i]}/tcp/{P2P_PORT}/")
        peers = Api(lab.addrs[i], 10).call("GET", "/peers")[1]
        for member in peers["members"]:
            addrs = member["addrs"]
            assert addrs, member
            assert all(a.startswith(f"/ip4/{by_id[member['peer_id']]}/") for a in addrs), \
                member
            assert not any("127.0.0.1" in a for a in addrs), member


def test_faults_cut_what_they_say_and_teardown_leaves_nothing():
    lab = Lab(3)
    try:
        lab.create()
        assert udp_reaches(lab, 0, 1) and udp_reaches(lab, 1, 0)
        lab.block(0, 1)  # one way
        assert not udp_reaches(lab, 0, 1)
        assert udp_reaches(lab, 1, 0) and udp_reaches(lab, 0, 2) and udp_reaches(lab, 2, 1)
        lab.heal()
        assert udp_reaches(lab, 0, 1)
        lab.partition({0}, {1, 2})
        assert not udp_reaches(lab, 0, 2) and not udp_reaches(lab, 2, 0)
        assert udp_reaches(lab, 1, 2)
        lab.heal()
        lab.link_down(2)
        assert not udp_reaches(lab, 0, 2) and udp_reaches(lab, 0, 1)
        lab.heal()
        assert udp_reaches(lab, 0, 2) and udp_reaches(lab, 2, 0)
    finally:
        lab.teardown()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(n in names for n in lab.names)
    assert lab.bridge not in links and not any(p in links for p in lab.ports)


def test_three_namespaces_form_a_network_through_a_testnet_file(lab3: Lab,
                                                                processes: Processes):
    nodes, _ = start_network(processes, lab3)
    assert_namespace_addresses(nodes, lab3)
    a, b = Api(lab3.addrs[0], 20), Api(lab3.addrs[2], 20)
    assert a.call("PUT", "/kv/greeting", {"value": {"from": "ns0"}, "consistency": "all"}) \
        == (200, {"ok": True})
    assert b.call("GET", "/kv/greeting?consistency=all") == \
        (200, {"key": "greeting", "value": {"from": "ns0"}})
    # and the data really crossed namespaces: each node's own store holds it
    for i in range(3):
        local = Api(lab3.addrs[i], 10).call("GET", "/kv-local/greeting")[1]
        assert local["present"] and local["value"] == {"from": "ns0"}, (i, local)


# -- the fault test -------------------------------------------------------------------------
ACK, FAIL, UNKNOWN = "ok", "fail", "unknown"
SETTLE_S = 60.0


def outcome(api: Api, method: str, path: str, body: Any) -> tuple[str, str]:
    """(outcome, why). ok: acknowledged. fail: certainly not applied (refused connection,
    4xx). unknown: maybe applied (a timeout, a reset, a 503: the store's quorum errors say a
    write may or may not have been applied)."""
    try:
        code, reply = api.call(method, path, body)
    except ConnectionRefusedError:
        return FAIL, "refused"
    except OSError as exc:
        return UNKNOWN, type(exc).__name__
    if code == 200:
        return ACK, ""
    why = f"{code} {reply.get('error') if isinstance(reply, dict) else reply}"
    return (FAIL if 400 <= code < 500 else UNKNOWN), why


class Writer(threading.Thread):
    """Through node `i`: PUT a unique value to a unique key, then incr its own counter and
    the shared one, again and again, recording every outcome with the nemesis's phase."""

    def __init__(self, i: int, host: str, phase: list[str], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.i, self.phase, self.stop = i, phase, stop
        self.api = Api(host, timeout=4)
        self.puts: dict[str, tuple[str, str]] = {}  # key -> (value, outcome)
        self.incrs: dict[str, Counter[str]] = {f"ctr-w{i}": Counter(), "ctr-all": Counter()}
        self.log: list[tuple[str, str, float]] = []  # (phase at the start, outcome, seconds)
        self.why: Counter[tuple[str, str]] = Counter()  # (phase, why) of each op not acked

    def run(self) -> None:
        j = 0
        while not self.stop.is_set() and j < 100_000:
            key = f"w{self.i}-{j}"
            value = f"{key}:{random.getrandbits(32):08x}"
            self.puts[key] = (value, self.op("PUT", f"/kv/{key}", {"value": value}))
            for counter in self.incrs:
                self.incrs[counter][self.op("POST", f"/kv/{counter}/incr", {"by": 1})] += 1
            j += 1
            self.stop.wait(0.15)  # a modest rate: five nodes share two cores
        self.api.close()

    def op(self, method: str, path: str, body: Any) -> str:
        phase, started = self.phase[0], time.monotonic()
        got, why = outcome(self.api, method, path, body)
        self.log.append((phase, got, time.monotonic() - started))
        if why:
            self.why[phase, why] += 1
        return got


def local_states(lab: Lab, keys: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Per node, what its own store holds for each key (no replica asked)."""
    states = []
    for i in range(lab.size):
        api = Api(lab.addrs[i], 10)
        states.append({k: api.call("GET", f"/kv-local/{quote(k)}")[1] for k in keys})
        api.close()
    return states


def violations(lab: Lab, ids: list[str], writers: list[Writer]) -> list[str]:
    """What the checker finds wrong in the replicas' own stores (empty when all is well)."""
    puts = {k: v for w in writers for k, v in w.puts.items()}
    counters: dict[str, Counter[str]] = {}
    for w in writers:
        for name, counts in w.incrs.items():
            counters.setdefault(name, Counter()).update(counts)
    return check(local_states(lab, sorted(puts) + sorted(counters)), ids, puts, counters)


def check(states: list[dict[str, dict[str, Any]]], ids: list[str],
          puts: dict[str, tuple[str, str]], counters: dict[str, Counter[str]]) -> list[str]:
    """The checker proper: `states[i][key]` is node i's /kv-local answer for `key`. Every
    acknowledged PUT is held with its value by every replica of its key, a PUT of unknown
    outcome by all of them or none, no replica holds a value never written, replicas agree,
    and every counter lies within [acknowledged, acknowledged + unknown] increments."""
    found = []
    for key in [*puts, *counters]:
        views = {tuple(sorted(s[key]["replicas"])) for s in states}
        if len(views) != 1:
            found.append(f"{key}: nodes disagree on its replicas: {views}")
            continue
        replicas = [ids.index(r) for r in next(iter(views))]
        held = {i: states[i][key]["value"] if states[i][key]["present"] else None
                for i in replicas}
        if len(set(map(json.dumps, held.values()))) != 1:
            found.append(f"{key}: replicas differ: {held}")
        if key in puts:
            value, got = puts[key]
            if got == ACK and any(v != value for v in held.values()):
                found.append(f"{key}: acknowledged {value!r}, replicas hold {held}")
            elif any(v not in (None, value) for v in held.values()):
                found.append(f"{key}: a value never written: {held}")
        else:
            counts = counters[key]
            low, high = counts[ACK], counts[ACK] + counts[UNKNOWN]
            for i, v in held.items():
                if not isinstance(v, int) or not low <= v <= high:
                    found.append(f"{key}: node {i} counts {v}, expected within [{low}, {high}]")
    return found


def test_checker_finds_each_kind_of_violation():
    ids = ["A", "B", "C", "D"]

    def local(value: Any, replicas: tuple[str, ...] = ("A", "B", "C")) -> dict[str, Any]:
        return {"present": value is not None, "value": value, "replicas": list(replicas)}

    def states(**keys: list[Any]) -> list[dict[str, dict[str, Any]]]:
        return [{k: local(v[i]) for k, v in keys.items()} for i in range(4)]

    puts = {"k": ("v", ACK), "u": ("w", UNKNOWN)}
    counters = {"c": Counter({ACK: 3, UNKNOWN: 2, FAIL: 5})}
    good = states(k=["v"] * 4, u=[None, None, None, "w"], c=[4, 4, 4, None])
    assert check(good, ids, puts, counters) == []
    for bad, expect in [
        (states(k=["v", None, "v", "v"], u=[None] * 4, c=[4] * 4), "acknowledged"),
        (states(k=["v"] * 4, u=["w", None, None, None], c=[4] * 4), "replicas differ"),
        (states(k=["v"] * 4, u=["x"] * 4, c=[4] * 4), "never written"),
        (states(k=["v"] * 4, u=[None] * 4, c=[2] * 4), "within [3, 5]"),
        (states(k=["v"] * 4, u=[None] * 4, c=[6] * 4), "within [3, 5]"),
    ]:
        found = check(bad, ids, puts, counters)
        assert found and all(expect in f or "replicas differ" in f for f in found), found
    split = good[:3] + [{**good[3], "k": local("v", ("A", "B", "D"))}]
    assert any("disagree" in f for f in check(split, ids, puts, counters))


def converged(nodes: list[NodeProcess]) -> bool:
    everyone = {n.peer_id(): "alive" for n in nodes}
    for node in nodes:
        status = node.status()
        if status is None or status["kv"]["ring_members"] != len(nodes) or \
                {m["peer_id"]: m["state"] for m in status["members"]} != everyone or \
                status["kv"]["hints_pending"] or status["kv"]["replication_backlog"]:
            return False
    return True


def test_faults_lose_no_acknowledged_write(lab5: Lab, processes: Processes):
    seed = int(os.environ.get("TASKNET_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    nodes, testnet = start_network(processes, lab5)
    assert_namespace_addresses(nodes, lab5)
    ids = [n.peer_id() or "" for n in nodes]
    order = list(range(5))
    rng.shuffle(order)
    killed, paused, isolated, one_way = order[0], order[1], order[2], (order[3], order[4])
    minority = set(rng.sample(range(5), 2))
    schedule = (f"seed {seed}: kill -9 n{killed}, SIGSTOP n{paused}, split "
                f"{sorted(set(range(5)) - minority)}/{sorted(minority)}, isolate n{isolated}, "
                f"one-way n{one_way[0]}->n{one_way[1]}")
    print(schedule)

    phase = ["warmup"]
    stop = threading.Event()
    writers = [Writer(i, lab5.addrs[i], phase, stop) for i in range(5)]
    started = time.monotonic()
    for w in writers:
        w.start()

    phases: list[str] = []

    def hold(name: str, seconds: float) -> None:
        if name not in phases:
            phases.append(name)
        phase[0] = name
        stop.wait(seconds)  # the fault lasts this long (not a wait for a condition)

    try:
        hold("warmup", 3)
        phases.append("kill")
        phase[0] = "kill"
        nodes[killed].proc.send_signal(signal.SIGKILL)
        nodes[killed].proc.wait(10)
        hold("kill", 4)
        nodes[killed] = start_node(processes, lab5, testnet, killed, f"n{killed}-again")
        assert wait_for(nodes[killed].peer_id, 30, "the restarted node") == ids[killed]
        hold("restarted", 3)
        phases.append("pause")
        phase[0] = "pause"
        nodes[paused].proc.send_signal(signal.SIGSTOP)
        try:
            hold("pause", 4)
        finally:
            nodes[paused].proc.send_signal(signal.SIGCONT)
        hold("resumed", 3)
        lab5.partition(set(range(5)) - minority, minority)
        hold("split", 5)
        lab5.heal()
        hold("healed", 3)
        lab5.link_down(isolated)
        hold("isolated", 5)
        lab5.heal()
        hold("healed2", 3)
        lab5.block(*one_way)
        hold("one-way", 5)
        lab5.heal()
        hold("calm", 3)
    finally:
        lab5.heal()
        stop.set()
        for w in writers:
            w.join(30)
    assert not any(w.is_alive() for w in writers)
    faults_s = time.monotonic() - started

    wait_for(lambda: converged(nodes), SETTLE_S, "all five alive, hints and backlogs drained")
    deadline = time.monotonic() + SETTLE_S
    found = violations(lab5, ids, writers)
    while found and time.monotonic() < deadline:  # anti-entropy may still be repairing
        time.sleep(1)
        found = violations(lab5, ids, writers)
    settle_s = time.monotonic() - started - faults_s

    table = {name: Counter[str]() for name in phases}
    slowest = dict.fromkeys(phases, 0.0)
    for w in writers:
        for name, got, seconds in w.log:
            table[name][got] += 1
            slowest[name] = max(slowest[name], seconds)
    print(f"faults {faults_s:.0f}s, settled in {settle_s:.0f}s")
    for name, counts in table.items():
        print(f"  {name:10} ack {counts[ACK]:4}  fail {counts[FAIL]:4}  "
              f"unknown {counts[UNKNOWN]:4}  slowest {slowest[name]:.1f}s  " + ", ".join(
                  f"{why} x{n}" for (p, why), n in sum((w.why for w in writers), Counter()).items()
                  if p == name))
    total = sum(table.values(), Counter())
    assert total[ACK] >= 200, (schedule, table)
    assert not found, f"{schedule}: {len(found)} violations: {found[:20]}"
    # and a client sees the same through every node: all acknowledged values, read at ALL
    acked = {k: v for w in writers for k, (v, got) in w.puts.items() if got == ACK}
    keys = sorted(acked)
    for i in range(5):
        code, reply = Api(lab5.addrs[i], 30).call(
            "POST", "/kv-read", {"keys": keys, "consistency": "all"})
        assert code == 200, (i, reply)
        lost = [k for k, got in zip(keys, reply["values"], strict=True) if got != acked[k]]
        assert not lost, f"{schedule}: node {i} reads {len(lost)} acknowledged keys wrong"
    # the faults really happened: the nemesis's drops met traffic
    assert sum(lab5.dropped(i) for i in range(5)) > 0
    assert all(n.proc.poll() is None for n in nodes), "a node died"
