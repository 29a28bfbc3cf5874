# The stake admission rule end to end: real node.py processes on one embedded ledger, under
# `--admission stake` on a task that three of them run (and so stake on) and a fourth does
# not have the code of. The staked nodes form the membership and the ring and serve each
# other; the un-staked node is in nobody's view or ring, its reads and writes fail, and what
# it asks of the others is refused and counted. Once it stakes (`node.py task stake`) it is a
# member everywhere within a few recheck periods and receives its partitions by handoff;
# once it unstakes it drops out again.
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tasknet_node.client import call_json

from process_helpers import NodeProcess, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
MODULE = str(Path(__file__).with_name("tasks_for_tests") / "echo.py")
TASK = "echo-1"
MIN_STAKE = 100
RECHECK = "1"
TASK_FILE = f"""\
name = "echo"
task_id = "{TASK}"
round_time_s = 3
min_stake = {MIN_STAKE}
bounty_per_round = 300
fund = 100000
start_in_s = 1
"""


def _members(node: NodeProcess) -> dict[str, str]:
    """peer id -> state of every member `node` lists (itself included)."""
    return node.states()


def _ring(node: NodeProcess) -> int | None:
    status = node.status()
    return None if status is None else status["kv"]["ring_members"]


def _admission(node: NodeProcess) -> dict[str, Any]:
    status = node.status()
    return {} if status is None else status["admission"]


def _kv(node: NodeProcess, *args: str) -> tuple[int, Any, str]:
    done = node.cli(*args)
    out = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, out, done.stderr


def test_only_staked_nodes_are_members_and_a_stake_admits(processes: Any,
                                                           tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    common = ("--ledger", str(ledger_dir), "--heartbeat-interval", "0.5",
              "--round-time", "20", "--admission", "stake", "--min-stake", str(MIN_STAKE),
              "--stake-task", TASK, "--admission-recheck", RECHECK)
    staking = (*common, "--task-module", MODULE)
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *staking)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    nodes = {"n0": boot,
             "n1": processes.node("n1", "--join", addr, *staking),
             "n2": processes.node("n2", "--join", addr, *staking),
             # no code for the echo task: it refuses to run it, so it never stakes on it
             "n3": processes.node("n3", "--join", addr, *common)}
    ids = {name: wait_for(node.announced, 30, f"{name} to start")[0]
           for name, node in nodes.items()}
    staked = {name: nodes[name] for name in ("n0", "n1", "n2")}
    stranger = nodes["n3"]

    # the task whose stake counts is created once the nodes run; those with its code stake
    (tmp_path / "echo.toml").write_text(TASK_FILE)
    wait_for(lambda: boot.cli("task", "create", "--file", str(tmp_path / "echo.toml"))
             .returncode == 0, 60, "the echo task to be created")

    three = {ids[name] for name in staked}
    for name, node in staked.items():
        wait_for(lambda node=node: _admission(node).get("self_admitted"), 60,
                 f"{name} to admit itself")
        wait_for(lambda node=node: {p for p, s in _members(node).items() if s == "alive"}
                 == three, 60, f"{name} to list the three staked nodes alive")
        wait_for(lambda node=node: _ring(node) == 3, 30, f"{name}'s ring of three")
    assert _admission(stranger)["settled"] and not _admission(stranger)["self_admitted"]
    for node in staked.values():
        assert ids["n3"] not in _members(node)

    # the staked nodes write and read each other's data
    code, answer, err = _kv(nodes["n0"], "put", "k/0", "zero")
    assert code == 0, err
    code, answer, err = _kv(nodes["n1"], "get", "k/0")
    assert code == 0 and answer["value"] == "zero", (code, answer, err)
    code, answer, err = _kv(nodes["n2"], "put", "k/2", "two")
    assert code == 0, err

    # the stranger: its writes and reads fail, it holds nothing, the others refuse what it
    # asks of them (membership messages) and count it
    code, answer, err = _kv(stranger, "put", "s/1", "mine")
    assert code == 2 and "not_admitted" in err and "stake of at least" in err, (code, err)
    code, answer, err = _kv(stranger, "get", "k/0")
    assert code == 2 and "not_admitted" in err, (code, err)
    assert stranger.status()["kv"]["keys"] == 0
    # (it knows the bootstrap node only: its view of the others stays empty)
    wait_for(lambda: boot.status()["metrics"]["swim_unadmitted"] > 0, 30,
             "the bootstrap node to count the stranger's refused membership messages")
    for node in staked.values():
        assert ids["n3"] not in _members(node)
        assert _ring(node) == 3
    keys = {f"batch/{i}": i for i in range(40)}
    assert _call(staked["n1"], "POST", "/kv-batch", {"put": keys})["count"] == len(keys)

    # it stakes enough: within a few recheck periods it is a member everywhere and receives
    # its partitions by handoff
    stake = stranger.cli("task", "stake", TASK, str(MIN_STAKE))
    assert stake.returncode == 0, stake.stderr
    four = three | {ids["n3"]}
    for name, node in nodes.items():
        wait_for(lambda node=node: {p for p, s in _members(node).items() if s == "alive"}
                 == four and _ring(node) == 4, 30, f"{name} to list the stranger, ring of four")
    assert _admission(stranger)["self_admitted"]

    def handed_off() -> bool:
        mine = [key for key in keys
                if ids["n3"] in _call(stranger, "GET", f"/kv-local/{key}")["replicas"]]
        return bool(mine) and all(_call(stranger, "GET", f"/kv-local/{key}")["present"]
                                  for key in mine)

    wait_for(handed_off, 60, "the stranger to hold the keys of its partitions")
    code, answer, err = _kv(stranger, "put", "s/1", "mine")
    assert code == 0, err
    code, answer, err = _kv(staked["n2"], "get", "s/1")
    assert code == 0 and answer["value"] == "mine", (code, answer, err)

    # it unstakes below the minimum: after the recheck it drops out of every view and ring
    unstake = stranger.cli("task", "unstake", TASK, str(MIN_STAKE))
    assert unstake.returncode == 0, unstake.stderr
    for name, node in staked.items():
        wait_for(lambda node=node: ids["n3"] not in _members(node) and _ring(node) == 3, 30,
                 f"{name} to drop the stranger")
    wait_for(lambda: not _admission(stranger)["self_admitted"], 30,
             "the stranger to see that it is not admitted")
    code, answer, err = _kv(stranger, "get", "s/1")
    assert code == 2 and "not_admitted" in err, (code, err)
    # its operator read each change once (not a line every recheck period)
    out = stranger.stdout()
    assert out.count("admission: this node is admitted") == 1, out
    assert out.count(f"admission: this node holds less than {MIN_STAKE}") == 2, out
    code, answer, err = _kv(staked["n0"], "get", "s/1")
    assert code == 0 and answer["value"] == "mine", (code, answer, err)

    # `node.py status` shows the admission state
    shown = json.loads(stranger.cli("status", "--json", check=True).stdout)["admission"]
    assert shown["rule"] == "stake" and shown["settled"] and not shown["self_admitted"]
    assert shown["describe"] == f"stake of at least {MIN_STAKE} on task {TASK}"

    # a staked node killed and restarted admits nobody until it reads the stakes again,
    # then takes its place in the ring again and serves
    n2 = staked["n2"]
    n2.proc.send_signal(signal.SIGKILL)
    n2.proc.wait()
    nodes["n2"] = staked["n2"] = n2 = processes.node("n2-again", "--join", addr, *staking,
                                                     data_dir=n2.data_dir)
    for name, node in staked.items():
        wait_for(lambda node=node: {p for p, s in _members(node).items() if s == "alive"}
                 == three and _ring(node) == 3, 60, f"{name} to hold the restarted node")
    code, answer, err = _kv(n2, "get", "s/1", "--consistency", "all")
    assert code == 0 and answer["value"] == "mine", (code, answer, err)
    assert ids["n3"] not in _members(n2)

    for node in nodes.values():
        node.proc.send_signal(signal.SIGTERM)
    for node in nodes.values():
        node.proc.wait(timeout=30)


def _call(node: NodeProcess, method: str, path: str, body: Any = None) -> Any:
    return call_json(node.data_dir, method, path, body)
