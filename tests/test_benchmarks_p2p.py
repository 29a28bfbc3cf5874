# Smoke tests of the p2p benchmark scripts: each runs as a subprocess at a tiny size and must
# print exactly one JSON line whose figures are present, numeric and mutually consistent.
from bench_helpers import run_benchmark


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_gossip_benchmark_reports_latency_and_throughput_of_both_clusters():
    figures = run_benchmark("gossip.py", "--nodes", "3", "--messages", "10", "--rate", "20")
    assert figures["nodes"] == 3 and figures["messages"] == 10
    assert "error" not in figures
    for field in ("latency_p50_ms", "latency_p99_ms", "raw_latency_p50_ms",
                  "raw_latency_p99_ms", "ours_msgs_per_s", "raw_msgs_per_s", "ratio"):
        assert positive(figures[field]), (field, figures)
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    assert figures["raw_latency_p50_ms"] <= figures["raw_latency_p99_ms"]
    # three nodes: the bootstrap plus two, so at least the two links to the bootstrap
    assert 2 <= figures["connections"] <= 3
    expected = figures["ours_msgs_per_s"] / figures["raw_msgs_per_s"]
    assert abs(figures["ratio"] - expected) <= 0.01 * expected + 0.002


def test_rpc_benchmark_reports_round_trips_and_bandwidth_of_both_sides():
    figures = run_benchmark(
        "rpc.py", "--requests", "20", "--bulk", "2", "--payload-kib", "64", "--rounds", "1")
    assert figures["requests"] == 20 and figures["payload_kib"] == 64
    for field in ("ours_rtt_per_s", "raw_rtt_per_s", "ratio_rtt", "ours_mb_per_s",
                  "raw_mb_per_s", "ratio_mb", "ratio"):
        assert positive(figures[field]), (field, figures)
    assert figures["ratio"] == min(figures["ratio_rtt"], figures["ratio_mb"])
    # with one round, each ratio is simply ours over raw
    rtt = figures["ours_rtt_per_s"] / figures["raw_rtt_per_s"]
    assert abs(figures["ratio_rtt"] - rtt) <= 0.01 * rtt + 0.002
