# The storage task on real node processes and real LevelDB directories: four nodes hold
# thousands of user keys on three replicas each and pass their storage audits; a fifth node
# joins, takes its partitions by handoff and passes too; then one node is stopped, its store
# loses its data in a way it cannot tell (every stored key deleted, the store closed cleanly:
# a loss it can tell is repaired at once) and it is started again: its storage submissions are
# rejected by its auditors, while the honest nodes stay accepted.
from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import crdt
from chain.ledger import LEDGER_FILE_NAME, Ledger
from chain.rules import ChainState, rejected_of
from kv import KVConfig
from shard import Keyspace, Store
from tasknet_node import datadir

from process_helpers import NodeProcess, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
TASK = "storage"
KEYS = 12_000


def _state(ledger_dir: Path) -> ChainState:
    with Ledger.open(ledger_dir / LEDGER_FILE_NAME) as ledger:
        return ledger.state


def _post(node: NodeProcess, path: str, body: object) -> Any:
    url = datadir.read_api_info(node.data_dir).url + path
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _keys_held(node: NodeProcess) -> int:
    status = node.status()
    return int(status["kv"]["keys"]) if status else -1


def _lose_every_key(data_dir: Path) -> int:
    """Delete every stored key of a stopped node's store, leaving it closed cleanly: the node
    cannot tell at its next start (a store that knows it lost data is repaired at once)."""
    with Store(data_dir / "kv" / "store", crdt.merge_encoded,
               Keyspace(KVConfig().partitions), create=False) as store:
        return sum(store.drop_partition(p, sync=False) for p in range(store.keyspace.partitions))


def test_a_node_that_lost_its_data_fails_its_storage_audits(processes: Any,
                                                           tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    common = ("--ledger", str(ledger_dir), "--round-time", "4", "--heartbeat-interval", "0.5",
              "--anti-entropy-interval", "3600")  # no repair behind the audits' back
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *common)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    nodes = {"n0": boot}
    for name in ("n1", "n2", "n3"):
        nodes[name] = processes.node(name, "--join", addr, *common)
    ids = {name: wait_for(node.announced, 30, f"{name} to start")[0]
           for name, node in nodes.items()}
    wait_for(lambda: all((n.status() or {}).get("kv", {}).get("ring_members") == 4
                         for n in nodes.values()), 60, "a ring of four")
    for start in range(0, KEYS, 4_000):
        _post(boot, "/kv-batch", {"put": {f"user/{i}": i for i in range(start, start + 4_000)},
                                  "consistency": "all"})
    # every key on its three replicas (all the data, plus task data and blobs)
    wait_for(lambda: sum(_keys_held(n) for n in nodes.values()) >= 3 * KEYS, 60,
             "every key on three replicas")

    def storage_rounds() -> dict[int, Any]:
        task = _state(ledger_dir).tasks.get(TASK)
        return {} if task is None else dict(task.rounds)

    def judged(after: int, who: set[str]) -> list[int]:
        """Rounds after `after` with submissions from all of `who`, their audits over."""
        state = _state(ledger_dir)
        task = state.tasks.get(TASK)
        if task is None:
            return []
        return [r for r, rs in task.rounds.items() if r > after and rs.paid
                and who <= set(rs.submissions)]

    # rounds that began after the data settled: every replica digests the same state
    everyone = set(ids.values())
    settled_at = max(storage_rounds(), default=0) + 1
    honest = wait_for(lambda: judged(settled_at, everyone)[:2] if len(
        judged(settled_at, everyone)) >= 2 else [], 90,
        "two settled storage rounds everyone submitted in")
    task = _state(ledger_dir).tasks[TASK]
    for r in honest:
        assert not rejected_of(task, r, task.rounds[r]), r

    # a fifth node joins and takes partitions by handoff: it passes its audits
    newcomer = processes.node("n4", "--join", addr, *common)
    ids["n4"] = wait_for(newcomer.announced, 30, "n4 to start")[0]
    # its share: 3 of 5 replicas of every key, less a margin for the ring's unevenness
    wait_for(lambda: _keys_held(newcomer) > 3 * KEYS // 5 * 0.7
             and all(not (n.status() or {}).get("kv", {}).get("handoff")
                     for n in [*nodes.values(), newcomer]), 120,
             "handoff to the newcomer to finish")
    joined_at = max(storage_rounds())
    passed = wait_for(lambda: judged(joined_at + 1, {ids["n4"]}), 90,
                      "a settled storage round the newcomer submitted in")
    task = _state(ledger_dir).tasks[TASK]
    for r in passed:
        assert ids["n4"] not in rejected_of(task, r, task.rounds[r]), r
    # n3 loses its data while stopped and comes back
    victim = nodes["n3"]
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.proc.wait(timeout=30) in (0, 1)
    assert _lose_every_key(victim.data_dir) > KEYS // 2
    stopped_at = max(storage_rounds())
    nodes["n3"] = victim = processes.node("n3-again", "--join", addr, *common,
                                          data_dir=victim.data_dir)
    wait_for(victim.announced, 30, "n3 to start again")

    def rejected_after_loss() -> list[int]:
        task = _state(ledger_dir).tasks[TASK]
        return [r for r in judged(stopped_at + 1, {ids["n3"]})
                if ids["n3"] in rejected_of(task, r, task.rounds[r])]

    lossy = wait_for(rejected_after_loss, 90, "the node that lost its data to be rejected")
    task = _state(ledger_dir).tasks[TASK]
    for r in lossy:
        rejected = rejected_of(task, r, task.rounds[r])
        assert not rejected & {ids[n] for n in ("n0", "n1", "n2", "n4")}, (r, rejected)

    for node in [*nodes.values(), newcomer]:
        node.proc.send_signal(signal.SIGTERM)
    for node in [*nodes.values(), newcomer]:
        node.proc.wait(timeout=30)
