# Smoke test of benchmarks/membership.py (simulated half): at tiny sizes it prints one JSON
# line whose figures agree with each other and with the same simulation run here (a run is
# reproducible from its seed), and it leaves the real-process figures empty for now.
# The figures themselves come from full-size runs; no speed is checked here.
from __future__ import annotations

import math

from p2p.swim import SwimConfig
from p2p.swim_sim import measure_network

from bench_helpers import run_benchmark, run_script

SIZES = (20, 50, 100)


def test_quick_run() -> None:
    figures = run_benchmark("membership.py", "--quick", timeout=120)
    assert "error" not in figures, figures
    assert figures["bench"] == "membership" and figures["sim_sizes"] == list(SIZES)
    cfg = SwimConfig()
    for n in SIZES:
        assert figures[f"sim_runs_{n}"] == 1
        converge = figures[f"sim_converge_periods_{n}"]
        detect, slowest = figures[f"sim_detect_periods_{n}"], figures[f"sim_detect_periods_max_{n}"]
        assert 0 < converge < 10
        # no crash is declared dead before the shortest suspicion timeout has run out
        min_timeout = max(cfg.suspicion_floor, cfg.suspicion_alpha * math.log10(n)) * cfg.period
        assert min_timeout <= detect <= slowest < 10 * min_timeout
        idle, churn = (figures[f"sim_bytes_per_node_per_period_{n}"],
                       figures[f"sim_churn_bytes_per_node_per_period_{n}"])
        assert 0 < idle < churn
        assert figures[f"sim_false_positives_{n}"] == 0
        # the same run here gives the same figures
        run = measure_network(n, seed=1)
        assert round(run.converge_periods or 0, 3) == converge
        assert round(sum(d or 0 for d in run.detect_periods) / 5, 3) == detect
        assert round(run.idle_bytes_per_node_per_period, 1) == idle
    # a quiet node's cost does not grow with the size of the network
    idles = [figures[f"sim_bytes_per_node_per_period_{n}"] for n in SIZES]
    assert max(idles) <= 1.5 * min(idles)
    for what in ("detect", "converge"):
        assert figures[f"sim_{what}_ratio_100_20"] == round(
            figures[f"sim_{what}_periods_100"] / figures[f"sim_{what}_periods_20"], 3)
    assert figures["sim_false_positive_rate_100"] == 0
    assert figures["sim_fp_loss"] == 0.05 and figures["sim_fp_periods"] == 300
    for field in ("converge_s_30", "detect_dead_s_30", "idle_cpu_pct_per_node_30",
                  "idle_bytes_per_s_per_node_30"):
        assert figures[field] is None
    assert "nodes_note" in figures


def test_benchmark_takes_its_arguments() -> None:
    done = run_script("membership.py", "--help", timeout=30)
    for flag in ("--quick", "--no-nodes", "--sim-nodes", "--fp-periods"):
        assert flag in done.stdout, flag
