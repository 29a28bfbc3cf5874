# The SWIM model's idle traffic (p2p/swim_sim.py's measure_idle, what benchmarks/testnet.py
# projects to 100 and 1,000 nodes) against real nodes: five libp2p nodes on 127.0.0.1 in one
# trio run, their swim_* metrics over an idle window, and the simulation with the same timing.
# The model must count every kind of message the nodes send, at their sizes and rates; a
# kind the node sends and the model leaves out, or bytes the model misses, fail here.
from __future__ import annotations

import time
from pathlib import Path

import trio

from p2p import Network
from p2p.network import swim_config
from p2p.swim import KIND, SEQ_HIGH, SEQ_LOW
from p2p.swim_sim import Simulation, measure_idle

from p2p_helpers import alive_ids, cluster, wait_for

N = 5
WINDOW_S = 8.0  # ~27 probes per node at the helpers' 0.3 s heartbeat
WINDOWS = 5  # windows tried until one holds no failed probe
# what moves only when a direct probe went unanswered: the kinds sent for it, and the
# core's counts of failed probes, suspicions raised and refuted, members declared dead
FAILURE_COUNTERS = ("swim_sent_ping_req", "swim_sent_nack", "swim_probes_failed",
                    "swim_indirect_probes", "swim_suspicions", "swim_confirmations",
                    "swim_refutations", "swim_declared_dead")


def swim_counters(net: Network) -> dict[str, int]:
    metrics = net.status()["metrics"]
    return {key: int(value) for key, value in metrics.items() if key.startswith("swim_")}


def per_kind(before: list[dict[str, int]], after: list[dict[str, int]], prefix: str,
             seconds: float) -> dict[str, float]:
    """Per node and second, by message kind (kinds sent at all)."""
    out = {}
    for kind in KIND.values():
        key = prefix + kind
        total = sum(b[key] - a[key] for a, b in zip(before, after, strict=True))
        if total:
            out[kind] = total / (len(before) * seconds)
    return out


async def test_model_counts_what_real_idle_nodes_send(tmp_path: Path) -> None:
    async with cluster(tmp_path, N) as nodes:
        ids = {net.peer_id for net in nodes}
        await wait_for(lambda: all(alive_ids(net) == ids for net in nodes), 60,
                       "every node to see every node alive")
        # idle: the joins' news sent its retransmissions, nothing left to piggyback (waited
        # for before each window below)
        # a window in which a direct probe timed out (a node starved of CPU on a loaded
        # machine) is not idle traffic: it holds the failure path (indirect probes, their
        # forwarded pings and acks, suspicion news and its refutation), and so does a window
        # that opens while such news from a probe just before it is still being spread;
        # measured again, a bounded number of times. News the failure path does not explain
        # (gossip at idle) still counts, and fails below.
        for _ in range(WINDOWS):
            await wait_for(lambda: all(swim_counters(net)["swim_pending_updates"] == 0
                                       for net in nodes), 60, "membership news to settle")
            before = [swim_counters(net) for net in nodes]
            started = time.monotonic()
            await trio.sleep(WINDOW_S)  # the measured window itself, not a wait for a condition
            after = [swim_counters(net) for net in nodes]
            seconds = time.monotonic() - started
            if not any(b[key] - a[key] for a, b in zip(before, after, strict=True)
                       for key in FAILURE_COUNTERS):
                break
        config = swim_config(nodes[0].config)
    real_bytes = per_kind(before, after, "swim_bytes_sent_", seconds)
    real_msgs = per_kind(before, after, "swim_sent_", seconds)
    real_total = sum(b["swim_bytes_sent"] - a["swim_bytes_sent"]
                     for a, b in zip(before, after, strict=True)) / (N * seconds)
    real_carried = sum(b["swim_carried_bytes_sent"] - a["swim_carried_bytes_sent"]
                       for a, b in zip(before, after, strict=True)) / (N * seconds)
    model = measure_idle(N, config=config)
    # every kind the nodes sent is in the model, each message of it as large (the same
    # encoder on the same messages: within 10% on average)
    assert {"ping", "ack"} <= set(real_bytes), real_bytes
    missing = set(real_bytes) - set(model.kind_bytes_per_s)
    assert not missing, f"the model sends no {missing}: real {real_bytes}, model " \
                        f"{model.kind_bytes_per_s}"
    for kind, rate in real_bytes.items():
        real_size = rate / real_msgs[kind]
        model_size = model.kind_bytes_per_s[kind] / model.kind_messages_per_s[kind]
        assert abs(real_size - model_size) <= 0.1 * model_size, (kind, real_size, model_size)
    # the probes and their acks at the same rate, and the whole within 20%
    for kind in ("ping", "ack"):
        assert abs(real_bytes[kind] - model.kind_bytes_per_s[kind]) <= \
            0.2 * model.kind_bytes_per_s[kind], (kind, real_bytes, model.kind_bytes_per_s)
    assert abs(real_total - model.bytes_per_s) <= 0.2 * model.bytes_per_s, \
        (real_total, model.bytes_per_s, real_bytes, model.kind_bytes_per_s)
    # nothing piggybacked at idle, in either
    assert real_carried <= 0.05 * real_total and model.carried_bytes_per_s == 0


def test_sequence_numbers_stay_three_bytes_however_long_a_node_runs() -> None:
    # a node's message numbers go round [SEQ_LOW, SEQ_HIGH): after more than a full round
    # (~70,000 probes each) every ping and ack of an idle network is still 6 bytes
    sim = Simulation(2, seed=2)
    sim.run(70_000 * sim.period)
    assert sim.kind_messages["ping"] / 2 > SEQ_HIGH - SEQ_LOW  # per node
    for kind in ("ping", "ack"):
        assert sim.kind_bytes[kind] == 6 * sim.kind_messages[kind], kind
    assert sim.kind_bytes["sync"] == 14 * sim.kind_messages["sync"]
