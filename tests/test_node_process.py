# System tests of `node.py` as real processes on 127.0.0.1: a bootstrap node and two others
# form a network; a node killed with SIGKILL is marked dead and rejoins with its identity;
# SIGTERM and SIGINT stop nodes cleanly; bad starts (a damaged LevelDB in the data dir among
# them) fail with one line and exit code 2.
# Every process is killed in the fixture's teardown, whatever happens in the test.
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import plyvel

import crdt
from kv import KVConfig
from kv.hints import HintStore
from shard import Keyspace, Store
from tasknet_node import datadir
from tasknet_node.gcpolicy import YOUNG_THRESHOLD
from tasknet_node.kv_extension import KV_DIR
from tasknet_node.procstats import parse_status

from process_helpers import ROOT, NodeProcess, Processes, processes_fixture, wait_for

NET = "proc-test"
FAST = ["--heartbeat-interval", "0.3", "--suspect-after", "1", "--dead-after", "2"]


processes = processes_fixture(NodeProcess)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {proc.args!r} still running after {timeout}s") from None


def test_network_of_processes_kill_restart_and_stop(processes: Processes, tmp_path: Path):
    boot = processes.node("boot", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--network", NET, *FAST)
    boot_id, boot_addr = wait_for(boot.announced, 20, "the bootstrap's start line")
    assert boot_addr.startswith("/ip4/127.0.0.1/tcp/") and boot_addr.endswith(f"/p2p/{boot_id}")
    key_mode = stat.S_IMODE((boot.data_dir / "node.key").stat().st_mode)
    assert key_mode == 0o600

    # one joins by address; one through a testnet file naming the bootstrap's data dir
    testnet = tmp_path / "testnet.toml"
    testnet.write_text(f'network_id = "{NET}"\n[bootstrap_node]\n'
                       f'data_dir = "{boot.data_dir}"\nlisten = "/ip4/127.0.0.1/tcp/0"\n')
    first = processes.node("first", "--join", boot_addr, "--network", NET, *FAST)
    second = processes.node("second", "--testnet", str(testnet), *FAST)
    first_id, _ = wait_for(first.announced, 20, "the first member's start line")
    second_id, _ = wait_for(second.announced, 20, "the second member's start line")
    everyone = {boot_id: "alive", first_id: "alive", second_id: "alive"}
    nodes = [boot, first, second]
    wait_for(lambda: all(n.states() == everyone for n in nodes), 20,
             "all three nodes to list each other alive")
    for node, peer_id in zip(nodes, everyone, strict=True):
        status = json.loads(node.cli("status", "--json", check=True).stdout)
        assert status["peer_id"] == peer_id and status["network"] == NET
        assert all(a.endswith(f"/p2p/{peer_id}") for a in status["addrs"])
        assert {m["peer_id"]: m["state"] for m in status["members"]} == everyone
        # what startup built is frozen out of the collector's walks (tasknet_node/gcpolicy.py)
        assert status["gc"]["frozen_objects"] > 10_000
        assert status["gc"]["thresholds"][0] == YOUNG_THRESHOLD
        # the node reads its own /proc: its figures match what the test reads of its pid
        own = parse_status(Path(f"/proc/{node.proc.pid}/status").read_text())
        process = status["process"]
        assert abs(process["rss_mb"] * 2**20 - own["rss"]) < 0.25 * own["rss"]
        assert process["rss_anon_mb"] + process["rss_file_mb"] <= process["rss_mb"] + 0.2
        assert process["threads"] >= 1 and process["open_fds"] >= 3
    assert f"member {first_id} joined" in boot.stdout()
    # by default status and peers print tables: the node's fields, a row per member
    text = boot.cli("status", check=True).stdout
    assert text.splitlines()[0].split() == ["peer", "id", boot_id]
    assert f"\nnetwork {NET}\n" in re.sub(" +", " ", text) and "3 alive" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.startswith("12D3")}
    assert set(rows) == set(everyone) and all(row[1] == "alive" for row in rows.values())
    peers = boot.cli("peers", check=True).stdout.splitlines()
    assert peers[0] == "2 connected, 2 other members known"
    assert peers[2].split()[:3] == ["PEER", "ID", "STATE"]
    assert sorted(line.split()[:3] for line in peers[3:]) == sorted(
        [peer, "alive", "yes"] for peer in (first_id, second_id))

    # SIGKILL: no goodbye; the others' failure detectors must find out
    first.proc.send_signal(signal.SIGKILL)
    wait_exit(first.proc, 5)
    wait_for(lambda: boot.states().get(first_id) == "dead"
             and second.states().get(first_id) == "dead", 15, "the killed node marked dead")
    assert (first.data_dir / "api.json").exists()  # left behind by the kill ...

    # ... and the restarted node rewrites it; same data dir, so same identity
    again = processes.node("first-again", "--join", boot_addr, "--network", NET, *FAST,
                           data_dir=first.data_dir)
    assert wait_for(again.announced, 20, "the restarted node's start line")[0] == first_id
    wait_for(lambda: all(n.states() == everyone for n in (boot, again, second)), 20,
             "the restarted node alive again everywhere")
    assert (again.status() or {}).get("incarnation") == 2
    assert f"member {first_id} restarted" in boot.stdout()

    # SIGTERM and SIGINT (Ctrl-C) stop a node cleanly within 2 s and remove api.json; a
    # second signal while it stops (a terminal's SIGINT and a supervisor's SIGTERM) too
    stopping = [(second, signal.SIGTERM), (again, signal.SIGINT), (boot, signal.SIGTERM)]
    for node, signum in stopping:
        sent = time.monotonic()
        node.proc.send_signal(signum)
        if node is again:
            node.proc.send_signal(signal.SIGTERM)
        assert wait_exit(node.proc, 5) == 0
        assert time.monotonic() - sent < 2.0
        assert not (node.data_dir / "api.json").exists()
        assert f"stopping ({signum.name})" in node.stdout()
        assert "Traceback" not in node.stderr()


def test_bad_starts_exit_2_with_one_line(processes: Processes, tmp_path: Path):
    common = ["--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--network", NET]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "node.key").write_text("tasknet-ed25519-seed-v1\nnot-hex\n")
    os.chmod(corrupt / "node.key", 0o600)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    locked = tmp_path / "locked"
    datadir.prepare(locked)
    cases = {
        "listen port in use": (["--bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}",
                                "--network", NET], tmp_path / "d1", "address in use"),
        "api port in use": ([*common, "--api", f"127.0.0.1:{port}"], tmp_path / "d2",
                            "Address already in use"),
        "corrupt key file": (common, corrupt, "key file"),
        "data dir is a file": (common, a_file, "not a directory"),
        "data dir in use": (common, locked, "in use by another node"),
        "unparsable multiaddr": (["--join", "/ip4/1.2.3.4/tcp/x/p2p/y"], tmp_path / "d3",
                                 "not a multiaddr"),
    }
    with busy, datadir.locked(locked):
        started = {case: processes.node(f"bad-{i}", *args, data_dir=data_dir)
                   for i, (case, (args, data_dir, _)) in enumerate(cases.items())}
        for case, node in started.items():
            assert wait_exit(node.proc, 30) == 2, f"{case}: {node.stderr()}"
    for case, node in started.items():
        err = node.stderr()
        assert err.startswith("node.py: error: ") and err.count("\n") == 1, f"{case}: {err}"
        assert cases[case][2] in err, f"{case}: {err}"
        assert node.stdout() == "", case
    assert (corrupt / "node.key").read_text() == "tasknet-ed25519-seed-v1\nnot-hex\n"
    assert not (tmp_path / "d1" / "api.json").exists()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _newest(directory: Path, pattern: str) -> Path:
    return max(directory.glob(pattern), key=lambda f: f.name)


def _store_with_keys(data_dir: Path, compact: bool = False) -> Path:
    """A node's store with 3,000 keys, closed cleanly; with `compact`, all of it in tables."""
    path = data_dir / KV_DIR / "store"
    with Store(path, crdt.merge_encoded, Keyspace(KVConfig().partitions)) as store:
        store.apply_deltas([(b"k%d" % i, crdt.encode(crdt.GCounter({"w": i + 1})))
                            for i in range(3000)])
    if compact:
        db = plyvel.DB(str(path))
        db.compact_range()
        db.close()
    return path


def _hints_with_items(data_dir: Path) -> Path:
    path = data_dir / KV_DIR / "hints"
    hints = HintStore(path)
    hints.add("some-peer", [(b"k%d" % i, b"delta") for i in range(300)])
    hints.close()
    return path


def _truncate_largest_table(path: Path) -> str:
    table = max(path.glob("*.ldb"), key=lambda t: t.stat().st_size)
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    return table.name


def _garbage_hint(path: Path) -> None:
    db = plyvel.DB(str(path))
    db.put(b"some-peer\x00" + bytes(8), b"\xc1 not msgpack")
    db.close()


# each: (what to do to a fresh data dir, returning the directory and the text the error
# line must hold besides it)
DAMAGE: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "flipped byte in the store's log": lambda d: (
        (p := _store_with_keys(d)), _flip_a_byte(_newest(p, "*.log")) or "Corruption"),
    "truncated store table": lambda d: (
        (p := _store_with_keys(d, compact=True)), _truncate_largest_table(p)),
    "garbage CURRENT": lambda d: (
        (p := _store_with_keys(d)), (p / "CURRENT").write_bytes(b"\x00garbage") and "CURRENT"),
    "missing CURRENT": lambda d: (
        (p := _store_with_keys(d)), (p / "CURRENT").unlink() or "CURRENT file is missing"),
    "flipped byte in the hints' log": lambda d: (
        (p := _hints_with_items(d)), _flip_a_byte(_newest(p, "*.log")) or "Corruption"),
    "unreadable hint": lambda d: (
        (p := _hints_with_items(d)), _garbage_hint(p) or "unreadable record"),
}


def test_damaged_leveldb_exits_2_with_one_line_naming_it(processes: Processes, tmp_path: Path):
    damaged = {}
    for i, (case, damage) in enumerate(DAMAGE.items()):
        data_dir = tmp_path / f"damaged-{i}"
        damaged[case] = (data_dir, *damage(data_dir))
    started = {case: processes.node(f"damaged-{i}", "--bootstrap", "--listen",
                                    "/ip4/127.0.0.1/tcp/0", "--network", NET, "--no-tasks",
                                    data_dir=data_dir)
               for i, (case, (data_dir, _, _)) in enumerate(damaged.items())}
    for case, node in started.items():
        assert wait_exit(node.proc, 30) == 2, f"{case}: {node.stderr()}"
    for case, node in started.items():
        _, path, text = damaged[case]
        err = node.stderr()
        assert err.startswith("node.py: error: ") and err.count("\n") == 1, f"{case}: {err}"
        assert str(path) in err and text in err, f"{case}: {err}"
        assert "move the directory aside and restart" in err, f"{case}: {err}"
        assert "Traceback" not in err and node.stdout() == "", case


def test_embedding_example_runs_and_exits(processes: Processes):
    proc, out, err = processes.spawn("embed", str(ROOT / "examples" / "embed.py"))
    assert wait_exit(proc, 30) == 0, err.read_text()
    text = out.read_text()
    assert "bob got gossip on 'news' from alice: {'round': 1, 'text': 'hi all'}" in text
    assert "alice asked bob to greet her: 'hello alice'" in text
    assert text.rstrip().endswith("both nodes stopped")
