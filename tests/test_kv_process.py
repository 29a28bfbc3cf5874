# System tests of the KV store inside `node.py` processes on 127.0.0.1: the key-value CLI
# commands end to end, the HTTP contract (errors, limits, metrics, the status section), and
# no acknowledged write lost when a node is SIGKILLed during writes and comes back, and a
# node whose store lost data while it was stopped says so and is refilled at once. Every
# process is killed in the fixture's teardown, whatever happens in the test. Also, in this
# process: the store's command-line flags and the handoff progress lines.
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

import crdt
from crdt import LWWRegister, Timestamp
from kv import KVConfig
from shard import Keyspace, Store
from tasknet_node import cli
from tasknet_node.kv_extension import report_handoff
from tasknet_node.options import build_kv_config

from process_helpers import (
    NODE,
    JsonApi,
    NodeProcess,
    Processes,
    processes_fixture,
    wait_for,
    wait_for_everyone,
)

NET = "kv-proc-test"
FAST = ["--heartbeat-interval", "0.5", "--suspect-after", "2", "--dead-after", "4",
        "--anti-entropy-interval", "1", "--network", NET, "--no-tasks"]


class Node(NodeProcess):
    def __init__(self, proc: subprocess.Popen, data_dir: Path, out: Path, err: Path) -> None:
        super().__init__(proc, data_dir, out, err)
        self.api = JsonApi(data_dir)

    def addr(self) -> str | None:
        announced = self.announced()
        return announced[1] if announced else None


processes = processes_fixture(Node)


def start_cluster(processes: Processes, size: int, flags: list[str] = FAST) -> list[Node]:
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *flags)
    addr = wait_for(boot.addr, 20, "the bootstrap node's address")
    nodes = [boot] + [processes.node(f"n{i}", "--join", addr, *flags) for i in range(1, size)]
    wait_for(lambda: all(n.peer_id() for n in nodes), 20, "every node's start line")
    wait_for_everyone(nodes, 30)
    return nodes


def answer(done: subprocess.CompletedProcess) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_commands_and_http_contract(processes: Processes, tmp_path: Path):
    a, b, c = start_cluster(processes, 3)

    assert answer(a.cli("put", "greeting", '{"hello": ["world", 1]}')) == {"ok": True}
    assert answer(b.cli("get", "greeting")) == {"key": "greeting",
                                                 "value": {"hello": ["world", 1]}}
    answer(a.cli("put", "plain", "not json at all", "--consistency", "all"))
    assert answer(c.cli("get", "plain", "--consistency", "one"))["value"] == "not json at all"
    answer(a.cli("incr", "visits", "5"))
    answer(c.cli("incr", "visits", "-2"))
    answer(b.cli("incr", "visits"))
    assert answer(b.cli("get", "visits"))["value"] == 4
    answer(a.cli("sadd", "tags", "x", "y", "z"))
    answer(b.cli("srem", "tags", "y"))
    assert answer(c.cli("get", "tags"))["value"] == ["x", "z"]
    answer(a.cli("hset", "account", "name", "ada"))
    answer(b.cli("hset", "account", "langs", '["py", "c"]'))
    answer(c.cli("hdel", "account", "name"))
    assert answer(a.cli("get", "account"))["value"] == {"langs": ["py", "c"]}
    answer(a.cli("put", "huge", "1e400"))  # not a finite JSON number: taken as text
    answer(a.cli("sadd", "huge-set", str(2**64), "7"))  # beyond 64 bits: text too
    assert answer(b.cli("get", "huge"))["value"] == "1e400"
    assert answer(b.cli("get", "huge-set"))["value"] == [7, str(2**64)]
    answer(c.cli("del", "greeting"))
    assert answer(a.cli("get", "greeting", "--consistency", "all")) == {"key": "greeting",
                                                                         "value": None}
    slashed = "a/b c?d%e"  # keys are any text; the CLI quotes them into the URL
    answer(a.cli("put", slashed, "1"))
    assert answer(c.cli("get", slashed))["value"] == 1

    wrong_type = a.cli("sadd", "visits", "m")
    assert wrong_type.returncode == 2 and "wrong_type" in wrong_type.stderr
    assert "key holds a counter (pncounter), not a set (orset)" in wrong_type.stderr
    bad_args = a.cli("incr", "visits", "lots")
    assert bad_args.returncode == 2 and bad_args.stdout == ""
    nobody = subprocess.run([sys.executable, NODE, "get", "k", "--data-dir",
                             str(tmp_path / "nobody")], capture_output=True, text=True)
    assert nobody.returncode == 1 and "no node is running" in nobody.stderr

    status = answer(a.cli("status", "--json"))
    assert status["kv"]["partitions_owned"] == status["kv"]["partitions"]  # N=3 of 3 nodes
    assert status["kv"]["keys"] == 8 and status["kv"]["hints_pending"] == {}

    # the HTTP contract, straight to the API
    api = b.api
    assert api.call("POST", "/kv-batch", {"put": {f"b{i}": i for i in range(50)}}) == \
        (200, {"ok": True, "count": 50})
    assert api.call("POST", "/kv-read", {"keys": ["b7", "nothing", "visits"]}) == \
        (200, {"values": [7, None, 4]})
    assert api.call("POST", "/kv/profile/hset", {"field": "name", "value": "ada"})[0] == 200
    assert api.call("POST", "/kv/profile/hset", {"field": "lang", "value": "py"})[0] == 200
    assert api.call("POST", "/kv/profile/hdel", {"field": "lang"})[0] == 200
    assert api.call("GET", "/kv/profile")[1]["value"] == {"name": "ada"}
    refusals = [
        (("PUT", "/kv/k", b"{not json"), 400, "bad_json"),
        (("PUT", "/kv/k", b'{"value": NaN}'), 400, "bad_json"),
        (("PUT", "/kv/k", b'{"value": 1}', "text/plain"), 415, "unsupported_media_type"),
        (("PUT", "/kv/k", {"nothing": 1}), 400, "bad_request"),
        (("PUT", "/kv/k", {"value": 2**64}), 400, "bad_value"),
        (("PUT", "/kv/k", {"value": "x" * 1_100_000}), 413, "too_large"),
        (("PUT", "/kv/" + "k" * 1100, {"value": 1}), 413, "too_large"),
        (("GET", "/kv/k?consistency=most"), 400, "bad_request"),
        (("POST", "/kv/visits/incr", {"by": "2"}), 400, "bad_request"),
        (("POST", "/kv/visits/sadd", {"members": ["m"]}), 400, "wrong_type"),
        (("POST", "/kv/tags/sadd", {"members": []}), 400, "bad_request"),
        (("POST", "/kv/tags/sadd", {"members": list(range(10_001))}), 413, "too_large"),
        (("POST", "/kv/tags/frob", {}), 404, "not_found"),
        (("POST", "/kv-batch", {"put": []}), 400, "bad_request"),
        (("POST", "/kv-read", {"keys": [1]}), 400, "bad_request"),
    ]
    for request, code, error in refusals:
        got = api.call(*request)
        assert got[0] == code and got[1]["error"] == error, (request[:2], got)
    local = api.call("GET", "/kv-local/b7")[1]
    assert local["present"] and local["value"] == 7 and len(local["replicas"]) == 3
    status = api.call("GET", "/kv-status")[1]
    assert status["keys"] >= 50
    listing = api.call("GET", "/kv-partitions")[1]
    rows = listing["partitions"]
    assert len(rows) == status["partitions_owned"]
    assert sum(row["keys"] for row in rows) == listing["keys"]  # all keys in owned partitions
    assert all(len(row["replicas"]) == 3 for row in rows)
    metrics = b.cli("metrics", check=True).stdout
    for name in ("tasknet_kv_keys ", "tasknet_kv_writes_total ", "tasknet_kv_reads_total ",
                 "tasknet_kv_read_repairs_total ", "tasknet_kv_hints_pending ",
                 "tasknet_kv_replication_backlog "):
        assert name in metrics

    # one replica down: writes and reads that need all three fail with exit code 3 / 503
    c_id = c.peer_id()
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait(5)
    wait_for(lambda: a.states().get(c_id) != "alive", 15, "the killed node no longer alive")
    refused = a.cli("put", "k", "v", "--consistency", "all")
    assert refused.returncode == 3 and "quorum" in refused.stderr, refused.stderr
    code, error = a.api.call("GET", "/kv/visits?consistency=all")
    assert code == 503 and error["error"] == "quorum"
    assert answer(a.cli("get", "visits"))["value"] == 4  # a quorum still answers

    # the store stops with the node, cleanly and in time
    for node in (a, b):
        node.api.close()
        sent = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(5) == 0
        assert time.monotonic() - sent < 2.0
        assert not (node.data_dir / "api.json").exists()


def test_operator_override_through_the_cli_and_http(processes: Processes, tmp_path: Path):
    # a node whose store holds far-future registers from before the clock skew bound existed
    data_dir = tmp_path / "solo"
    far = crdt.encode(LWWRegister().assign("before", Timestamp(2**64 - 1, 0), "old"))
    with Store(data_dir / "kv" / "store", merge=crdt.merge_encoded,
               keyspace=Keyspace(KVConfig().partitions)) as store:
        store.put_states([(b"stuck", far), (b"gone", far), (b"web", far)])
    node = processes.node("solo", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *FAST,
                          data_dir=data_dir)
    wait_for(lambda: node.status() is not None, 20, "the node's API")
    refused = node.cli("put", "stuck", "new")
    assert refused.returncode == 2 and "clock_skew" in refused.stderr, refused.stderr
    assert "--override-skew" in refused.stderr  # the message names the way out
    assert node.cli("del", "gone").returncode == 2
    assert answer(node.cli("get", "stuck"))["value"] is None  # beyond the bound: absent
    assert answer(node.cli("put", "stuck", "new", "--override-skew")) == {"ok": True}
    assert answer(node.cli("get", "stuck"))["value"] == "new"
    assert answer(node.cli("del", "gone", "--override-skew")) == {"ok": True}
    api = node.api
    code, error = api.call("PUT", "/kv/web?override_skew=maybe", {"value": 1})
    assert code == 400 and error["error"] == "bad_request"
    code, error = api.call("DELETE", "/kv/web")
    assert code == 400 and error["error"] == "clock_skew"
    assert api.call("PUT", "/kv/web?override_skew=true", {"value": 1}) == (200, {"ok": True})
    assert api.call("GET", "/kv/web") == (200, {"key": "web", "value": 1})
    assert api.call("DELETE", "/kv/web?override_skew=true") == (200, {"ok": True})
    assert api.call("GET", "/kv/gone") == (200, {"key": "gone", "value": None})
    metrics = node.cli("metrics", check=True).stdout
    assert "tasknet_kv_skew_overrides_total 3" in metrics
    assert "tasknet_kv_skew_refused_total " in metrics
    api.close()


class Writer(threading.Thread):
    """Single QUORUM puts, round robin over `targets`, each read back (QUORUM) from the next
    target. Records every acknowledged key and every failure with its start time."""

    def __init__(self, targets: list[Node]) -> None:
        super().__init__(daemon=True)
        self.targets = targets  # the test thread swaps in another list
        self.acked: dict[str, int] = {}
        self.failures: list[tuple[float, str, str]] = []  # (start time, request, outcome)
        self.reads = 0
        self.stop = threading.Event()
        self._apis: dict[Path, JsonApi] = {}

    def _call(self, node: Node, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        api = self._apis.setdefault(node.data_dir, JsonApi(node.data_dir))
        try:
            return api.call(method, path, body)
        except (OSError, ValueError) as exc:
            return 0, str(exc)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            targets = self.targets
            key = f"w{i}"
            started = time.monotonic()
            code, reply = self._call(targets[i % len(targets)], "PUT", f"/kv/{key}",
                                     {"value": i})
            if code == 200:
                self.acked[key] = i
                started = time.monotonic()
                code, reply = self._call(targets[(i + 1) % len(targets)], "GET", f"/kv/{key}")
                self.reads += 1
                if code != 200 or reply["value"] != i:
                    self.failures.append((started, f"GET {key}", f"{code} {reply}"))
            else:
                self.failures.append((started, f"PUT {key}", f"{code} {reply}"))
            i += 1
        for api in self._apis.values():
            api.close()


def test_no_acknowledged_write_lost_when_a_node_is_killed(processes: Processes):
    nodes = start_cluster(processes, 4)
    live, victim = nodes[:3], nodes[3]
    victim_id = victim.peer_id()
    writer = Writer(list(nodes))
    writer.start()
    try:
        wait_for(lambda: len(writer.acked) >= 100, 20, "writes before the kill")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(5)
        writer.targets = list(live)
        wait_for(lambda: all(n.states().get(victim_id) != "alive" for n in live), 15,
                 "the others to stop counting on the killed node")
        down = time.monotonic()
        acked_at_down = len(writer.acked)
        wait_for(lambda: len(writer.acked) >= acked_at_down + 100, 20,
                 "writes while the node is down")
        restarting = time.monotonic()
        again = processes.node("n3-again", "--join", nodes[0].addr(), *FAST,
                               data_dir=victim.data_dir)
        assert wait_for(again.peer_id, 20, "the restarted node's start line") == victim_id
        wait_for_everyone([*live, again], 30)
    finally:
        writer.stop.set()
        writer.join(60)
    assert not writer.is_alive()
    # around the kill and the restart some requests may fail (not acknowledged); while the
    # node was known to be down, every QUORUM write and read must have succeeded
    assert not [f for f in writer.failures if down <= f[0] < restarting], writer.failures
    assert writer.reads >= len(writer.acked) - len(writer.failures)
    acked = writer.acked
    assert len(acked) >= 250

    everyone = [*live, again]
    wait_for(lambda: all(s is not None and not s["kv"]["hints_pending"]
                         and not s["kv"]["replication_backlog"]
                         for s in (n.status() for n in everyone)), 30, "hints drained")
    keys = sorted(acked)
    for node in everyone:
        # a node that just saw a peer restart may count it suspect for a moment and answer
        # 503 (too few replicas): like a client, ask again until a deadline
        def read(node=node):
            response = node.api.call("POST", "/kv-read", {"keys": keys, "consistency": "quorum"})
            return response if response[0] != 503 else None

        code, reply = wait_for(read, 30, "a quorum read of every acknowledged key")
        assert code == 200, reply
        lost = {k: v for k, v, got in zip(keys, [acked[k] for k in keys], reply["values"],
                                          strict=True) if got != v}
        assert not lost, f"{len(lost)} acknowledged writes not read back: {sorted(lost)[:10]}"

    # catch-up: the restarted node itself holds every acknowledged key it is a replica of
    owned, missing = [], []
    for key in keys:
        local = again.api.call("GET", f"/kv-local/{quote(key)}")[1]
        if victim_id in local["replicas"]:
            owned.append(key)
            if local["value"] != acked[key]:
                missing.append(key)
    assert not missing, f"{len(missing)} of {len(owned)} owned keys missing: {missing[:10]}"
    assert len(owned) > len(keys) // 2  # N=3 of 4 nodes: about 3/4 of the keys
    code, reply = again.api.call("POST", "/kv-read", {"keys": owned, "consistency": "one"})
    assert code == 200 and reply["values"] == [acked[k] for k in owned]


def test_store_that_lost_data_while_stopped_is_repaired_at_once(processes: Processes):
    # periodic anti-entropy far off: only the repair at start can refill the store in time
    flags = [*FAST, "--anti-entropy-interval", "600"]
    a, _, victim = start_cluster(processes, 3, flags)
    values = {f"kept-{i}": i for i in range(300)}
    assert a.api.call("POST", "/kv-batch", {"put": values, "consistency": "quorum"})[0] == 200

    def held(node: Node) -> int:
        return int(node.api.call("GET", "/kv-status")[1]["keys"])

    wait_for(lambda: held(victim) == 300, 30, "the victim to hold every key")
    victim.proc.send_signal(signal.SIGINT)
    assert victim.proc.wait(30) == 0
    # a log truncated while the node is stopped: LevelDB drops its tail without an error
    store = victim.data_dir / "kv" / "store"
    log = max(store.glob("*.log"), key=lambda f: f.name)
    log.write_bytes(log.read_bytes()[: log.stat().st_size * 3 // 100])

    again = processes.node("n2-again", "--join", a.addr(), *flags, data_dir=victim.data_dir)
    wait_for(again.peer_id, 20, "the restarted node's start line")
    restarted = time.monotonic()
    warning = wait_for(lambda: re.search(r"WARNING .*store .* lost data since its last clean "
                                         r"close: (\d+) keys expected, (\d+) found; this node "
                                         r"repairs its replicas", again.stderr()),
                       20, "the warning about the lost data")
    assert int(warning.group(1)) == 300 and int(warning.group(2)) < 200, warning.group(0)
    wait_for(lambda: held(again) == 300, 60, "the restarted node's own store refilled")
    assert time.monotonic() - restarted < 60
    wait_for(lambda: "repair: done" in again.stderr(), 30, "the repair's last progress line")
    assert "repair: compared" in again.stderr()
    for key, value in values.items():  # its own replica, not a quorum read
        local = again.api.call("GET", f"/kv-local/{quote(key)}")[1]
        assert local["present"] and local["value"] == value, local


async def test_handoff_progress_lines(autojump_clock):
    progress = iter([
        {},
        {"partitions_left": 5, "keys_left": 900, "keys_sent": 0},
        {"partitions_left": 5, "keys_left": 900, "keys_sent": 0},
        {"partitions_left": 3, "keys_left": 900, "keys_sent": 1000},
        {},
        {},
    ])
    said: list[tuple[float, str]] = []
    with trio.move_on_after(13):
        await report_handoff(lambda: {"handoff": next(progress)},
                             lambda line: said.append((trio.current_time(), line)), 2.0)
    assert said == [(4.0, "handoff: 5 partitions left, 0 keys sent"),
                    (8.0, "handoff: 3 partitions left, 1000 keys sent"),
                    (10.0, "handoff: done")]


def test_store_flags():
    default = build_kv_config(cli.run_parser().parse_args(["--bootstrap"]))
    assert default == KVConfig()
    tuned = build_kv_config(cli.run_parser().parse_args([
        "--bootstrap", "--replicas", "5", "--write-consistency", "all",
        "--read-consistency", "one", "--anti-entropy-interval", "0.5",
        "--max-clock-skew", "60"]))
    assert (tuned.replicas, tuned.write_consistency, tuned.read_consistency,
            tuned.anti_entropy_interval, tuned.max_clock_skew_s) == (5, "all", "one", 0.5, 60)
    for bad in (["--replicas", "0"], ["--replicas", "two"], ["--write-consistency", "most"],
                ["--anti-entropy-interval", "-1"], ["--max-clock-skew", "0"]):
        assert cli.main(["--bootstrap", *bad]) == 2
