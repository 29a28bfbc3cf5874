# Smoke test of benchmarks/testnet.py: with 3 nodes in network namespaces (needs root and
# iproute2; fails, never skips, without) it prints one JSON line whose figures are present
# and consistent (pubsub gossip delivery among them, the bytes on each node's interface no
# fewer than its SWIM counters), with the SWIM model's projection, and
# leaves no node process and no namespace behind. No speed is checked; the figures come
# from full-size runs.
from __future__ import annotations

import subprocess

from bench_helpers import processes_mentioning, run_benchmark, run_script


def test_quick_run_reports_every_figure_and_leaves_nothing() -> None:
    figures = run_benchmark("testnet.py", "--sizes", "3", "--quick", timeout=60)
    assert "error" not in figures, figures
    assert figures["bench"] == "testnet" and figures["sizes"] == [3]
    assert 0 < figures["converge_s_3"] < 60
    p50, p99 = figures["join_spread_s_p50_3"], figures["join_spread_s_p99_3"]
    assert 0 <= p50 <= p99 < 60
    idle, most = figures["idle_bytes_per_s_per_node_3"], figures["idle_bytes_per_s_per_node_3_max"]
    assert 0 < idle <= most  # the nodes probe each other while idle
    for n in (3, 100, 1000):
        assert figures[f"model_idle_bytes_per_s_per_node_{n}"] > 0
    assert 0 <= figures["idle_settle_s_3"] < 60  # the joins' news went out before the window
    kinds, model_kinds = figures["idle_bytes_by_kind_3"], figures["model_idle_bytes_by_kind_3"]
    assert {"ping", "ack"} <= set(kinds) and {"ping", "ack", "sync"} <= set(model_kinds)
    model = figures["model_idle_bytes_per_s_per_node_3"]
    assert abs(figures["measured_model_ratio_3"] * model - idle) <= 0.01 * idle
    # the wire: each node's eth0 carries its SWIM bytes and more (headers, encryption,
    # framing, the other protocols), so it sends at least what its SWIM counters say
    wire = figures["idle_wire_bytes_per_s_per_node_3"]
    assert idle <= wire <= figures["idle_wire_bytes_per_s_per_node_3_max"]
    assert figures["idle_wire_packets_per_s_per_node_3"] > 0
    assert figures["idle_wire_rx_bytes_per_s_per_node_3"] > 0
    assert figures["wire_to_swim_ratio_3"] >= 1
    assert abs(figures["wire_to_swim_ratio_3"] * idle - wire) <= 0.01 * wire
    # pubsub gossip: every message reached both other nodes, no faster than one request to
    # a node through the bridge, and the slowest node no sooner than the median pair
    assert figures["gossip_messages_3"] == 10
    assert figures["gossip_delivered_share_3"] == 1.0 and figures["gossip_all_share_3"] == 1.0
    assert 0 < figures["gossip_mesh_s_3"] < 60
    assert 0 < figures["api_rtt_ms_3"]
    node50, node99 = figures["gossip_node_p50_ms_3"], figures["gossip_node_p99_ms_3"]
    all50, all99 = figures["gossip_p50_ms_3"], figures["gossip_p99_ms_3"]
    assert 0 < node50 <= node99 < 5000 and node50 <= all50 <= all99 == node99
    assert not processes_mentioning("tasknet-testnet-"), "a node process was left running"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert figures["netns_prefix"].startswith("tnet")
    assert figures["netns_prefix"] not in names, "a namespace was left behind"


def test_benchmark_takes_its_arguments() -> None:
    done = run_script("testnet.py", "--help", timeout=30)
    for flag in ("--sizes", "--idle-s", "--messages", "--spacing-s", "--quick"):
        assert flag in done.stdout, flag
