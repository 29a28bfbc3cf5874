# Membership at scale on real processes: 30 node.py processes on this machine (the store only,
# no task rounds) converge to one view with everyone alive, and a SIGKILLed node is declared
# dead by every other node. The bounds are generous and do not grow with the number of nodes
# (SWIM: a constant number of messages per node and period; detection in O(log N) periods):
# the old gossip heartbeats took 80 s to converge and 66 s to detect at 30 nodes here.
from __future__ import annotations

import signal
import time
from typing import Any

from process_helpers import NodeProcess, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
NODES = 30
CONVERGE_S = 120  # generous: 30 processes start on 2 shared cores
DETECT_S = 60  # generous: measured 10 s on a quiet machine, 28 s on a loaded one


def test_thirty_processes_converge_and_detect_a_kill(processes: Any) -> None:
    common = ("--no-tasks", "--heartbeat-interval", "1")
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *common)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    nodes = [boot] + [processes.node(f"n{i}", "--join", addr, *common) for i in range(1, NODES)]
    ids = [wait_for(n.announced, 60, f"node {i} to start")[0] for i, n in enumerate(nodes)]
    everyone = set(ids)

    def states(node: NodeProcess) -> dict[str, str]:
        return node.states()

    def converged() -> bool:
        return all(set(s) >= everyone and all(v == "alive" for k, v in s.items()
                                              if k in everyone)
                   for s in map(states, nodes))

    started = time.monotonic()
    wait_for(converged, CONVERGE_S, f"all {NODES} nodes to see all alive")
    converge_s = time.monotonic() - started
    victim, victim_id = nodes[7], ids[7]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed = time.monotonic()
    survivors = [n for n in nodes if n is not victim]
    wait_for(lambda: all(states(n).get(victim_id) == "dead" for n in survivors), DETECT_S,
             "every node to declare the killed one dead")
    detect_s = time.monotonic() - killed
    # nobody else was declared dead meanwhile
    for node in survivors:
        wrong = {k for k, v in states(node).items() if v == "dead" and k != victim_id}
        assert not wrong, (node.data_dir, wrong)
    print(f"converged in {converge_s:.1f} s, detected in {detect_s:.1f} s")
    for node in survivors:
        node.proc.send_signal(signal.SIGTERM)
    for node in survivors:
        node.proc.wait(timeout=30)
