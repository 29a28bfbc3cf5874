# `node.py localnet up|status|down` as a user runs it: real node.py processes (and a real
# anvil) on 127.0.0.1, started detached by `up`, then checked through their control APIs and
# their pids. Every test stops what it started: `localnet down`, then SIGKILL by the pids the
# pid files named, as a last resort.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasknet_node.client import ApiRefused, NodeUnreachable, call_json
from tasknet_node.localnet import _running

from process_helpers import NODE, wait_for


def recorded_pids(base: Path) -> dict[int, str]:
    """pid -> what its command line holds, for every process the localnet's files name."""
    pids = {int(p.read_text()): str(base) for p in base.glob("**/*.pid")
            if p.read_text().strip().isdigit()}
    chain = base / "chain.json"
    if chain.exists():
        pids[int(json.loads(chain.read_text())["anvil_pid"])] = "anvil"
    return pids


def still_running(pids: dict[int, str]) -> list[int]:
    return [pid for pid, marker in pids.items() if _running(pid, marker)]


class Localnet:
    """`node.py localnet ... --dir base`; every pid its files named after a command is kept,
    so teardown can kill what a broken `down` left running."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.seen: dict[int, str] = {}

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([sys.executable, NODE, "localnet", *args, "--dir",
                                   str(self.base)], capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            self.remember()

    def remember(self) -> dict[int, str]:
        pids = recorded_pids(self.base) if self.base.exists() else {}
        self.seen.update(pids)
        return pids


@pytest.fixture
def localnet(tmp_path: Path) -> Iterator[Localnet]:
    net = Localnet(tmp_path / "net")
    try:
        yield net
    finally:
        net("down", timeout=60)
        for pid in still_running(net.seen):  # the last resort
            os.kill(pid, signal.SIGKILL)


def test_ledger_localnet_up_status_down(localnet: Localnet) -> None:
    net = localnet.base
    up = localnet("up", "--nodes", "3", "--chain", "ledger")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "3/3 nodes alive, 3/3 see every node" in up.stdout
    assert "localnet up: 3 node(s) on 127.0.0.1" in up.stdout
    for i in range(3):
        assert f"python node.py status --data-dir {net / f'node{i}'}" in up.stdout
    pids = recorded_pids(net)
    assert len(pids) == 3 and len(still_running(pids)) == 3

    again = localnet("up", "--nodes", "3")
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "already running" in again.stderr
    assert still_running(pids) == list(pids)  # the refused `up` touched nothing

    status = localnet("status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = [line for line in status.stdout.splitlines() if line.startswith("node")]
    assert len(lines) == 3
    assert all(": running (pid " in line and "sees 3 alive" in line and "api http://127.0.0.1:"
               in line for line in lines), status.stdout

    def write_then_read() -> bool:  # through node0's API, read back through node2's
        try:
            call_json(net / "node0", "PUT", "/kv/greeting", {"value": "hello"}, timeout=10)
            answer = call_json(net / "node2", "GET", "/kv/greeting", timeout=10)
        except (ApiRefused, NodeUnreachable):
            return False  # the ring may still be settling
        return isinstance(answer, dict) and answer.get("value") == "hello"
    wait_for(write_then_read, 30, "a write through node0 readable through node2")

    down = localnet("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped node0, node1, node2" in down.stdout
    assert still_running(pids) == []
    assert list(net.glob("**/*.pid")) == []
    twice = localnet("down")
    assert twice.returncode == 0 and "nothing was running" in twice.stdout
    stopped = localnet("status")
    assert stopped.returncode == 1 and stopped.stdout.count(": stopped") == 3


def test_evm_localnet_down_leaves_no_anvil(localnet: Localnet) -> None:
    net = localnet.base
    up = localnet("up", "--nodes", "2", "--chain", "evm", "--admission", "allowlist")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "contract: TaskSettlement" in up.stdout and up.stdout.count("wallet: node") == 2
    testnet = (net / "testnet.toml").read_text()
    assert 'kind = "evm"' in testnet and 'rule = "allowlist"' in testnet
    peers = json.loads((net / "localnet.json").read_text())["peers"]
    assert all(peer in testnet for peer in peers)
    pids = recorded_pids(net)
    assert len(pids) == 4  # two nodes, the chain keeper, anvil
    assert len(still_running(pids)) == 4
    status = localnet("status")
    assert status.returncode == 0 and "chain: anvil http://127.0.0.1:" in status.stdout

    down = localnet("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert still_running(pids) == []
    assert not (net / "chain.json").exists()


def test_interrupted_up_stops_what_was_started_and_stale_pids_do_not_block(
        localnet: Localnet) -> None:
    net = localnet.base

    def node1_started() -> bool:
        localnet.remember()
        return (net / "node1" / "node.pid").exists() or up.poll() is not None
    up = subprocess.Popen([sys.executable, NODE, "localnet", "up", "--nodes", "2", "--dir",
                           str(net)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(node1_started, 30, "up to start node1")
        started = recorded_pids(net)
        up.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    localnet.remember()
    assert up.returncode == 130, out + err
    assert "interrupted: stopping what was started" in out
    assert len(started) == 2
    # `up` waited for its nodes to exit; a loaded machine may still be tearing the last one
    # down (reaping, its /proc entry) for a moment
    wait_for(lambda: still_running(started) == [], 10, "the started nodes to be gone")
    assert list(net.glob("**/*.pid")) == []

    (net / "node0" / "node.pid").write_text(f"{up.pid}\n")  # a pid file left by a killed run
    again = localnet("up", "--nodes", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"removed a stale pid file: {net / 'node0' / 'node.pid'}" in again.stdout
