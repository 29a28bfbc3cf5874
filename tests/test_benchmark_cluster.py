# Smoke test of benchmarks/cluster.py: at its --quick sizes it runs real node processes,
# prints one JSON line whose figures are present and consistent with each other, and leaves
# neither files nor processes behind. (The figures themselves come from full-size runs.)
from __future__ import annotations

import os
import signal
from pathlib import Path

from bench_helpers import processes_mentioning, run_benchmark

RATES = ("writes_per_s_w2_n3", "batched_writes_per_s_w2_n3", "raw_plyvel_sync_batch_per_s",
         "lag_rate_per_s", "handoff_keys_per_s")
TIMES = ("lag_p50_ms", "lag_p99_ms", "catchup_s", "catchup_api_s", "handoff_s",
         "handoff_join_s", "rss_mb_per_node", "idle_rss_mb")


def test_quick_run_reports_every_figure_and_cleans_up(tmp_path: Path) -> None:
    try:
        _check_quick_run(tmp_path)
    finally:  # the script's nodes die with it on failure; this also gets any it left behind
        for pid in processes_mentioning(str(tmp_path)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _check_quick_run(tmp_path: Path) -> None:
    figures = run_benchmark("cluster.py", "--quick", "--nodes-list", "3", timeout=90,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert "error" not in figures, figures
    assert not [name for name in figures if name.endswith("_first_failure")], figures

    for name in RATES + TIMES:
        value = figures[name]
        assert isinstance(value, int | float) and value > 0, (name, figures)
    # every request of the quick sizes was acknowledged
    assert figures["writes_per_s_w2_n3_acked"] == 100
    assert figures["batched_writes_per_s_w2_n3_acked"] == 4 * figures["batch_size"]
    assert figures["catchup_writes"] == figures["catchup_keys"] == 500
    # the derived figures agree with the measured ones
    expected_ratio = figures["batched_writes_per_s_w2_n3"] / figures["raw_plyvel_sync_batch_per_s"]
    assert abs(figures["ratio"] - expected_ratio) <= 0.001 + 0.01 * expected_ratio
    assert figures["batched_vs_raw_ratio"] == figures["ratio"]
    assert figures["lag_p50_ms"] <= figures["lag_p99_ms"]
    assert figures["lag_samples"] >= 5
    assert figures["catchup_api_s"] < figures["catchup_s"]
    assert figures["handoff_join_s"] < figures["handoff_s"]
    moved = figures["handoff_keys_per_s"] * figures["handoff_s"]
    assert abs(moved - figures["handoff_newcomer_keys"]) <= 0.01 * moved + 1
    # three replicas of every key across the four nodes once the handoff is over
    assert sum(figures["handoff_node_keys"]) == 3 * figures["handoff_total_keys"]
    assert figures["handoff_total_keys"] >= figures["keys"] == figures["rss_keys"]
    assert figures["rss_mb_per_node"] == max(figures["rss_mb_nodes"])
    assert len(figures["rss_mb_nodes"]) == 3
    # RssAnon and RssFile are parts of VmRSS (the kernel's own split), read per node
    for rss, anon, mapped in zip(figures["rss_mb_nodes"], figures["rss_anon_mb_nodes"],
                                 figures["rss_file_mb_nodes"], strict=True):
        assert 0 < anon <= rss + 1 and 0 < mapped <= rss + 1

    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
    assert processes_mentioning(str(tmp_path)) == [], "node processes left running"
