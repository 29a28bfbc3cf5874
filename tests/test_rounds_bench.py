# Smoke test of benchmarks/rounds.py without node processes: at tiny sizes it prints one JSON
# line whose figures come from that run (they agree with each other, with the ledger it wrote
# and with a simulation run here), and it leaves neither files nor writer processes behind.
# The figures themselves come from full-size runs; no speed is checked here.
from __future__ import annotations

import os
from pathlib import Path

from tasks.simulate import simulate

from bench_helpers import processes_mentioning, run_benchmark, run_script

WRITERS = 3
MAX_TX = 40


def close(measured: float, expected: float) -> bool:
    """Equal but for the rounding of the printed figures (seconds have 3 decimals, so a
    rate from a 0.05 s phase is off by up to 1% and more)."""
    return abs(measured - expected) <= 0.002 + 0.05 * abs(expected)


def test_quick_run_without_nodes(tmp_path: Path) -> None:
    figures = run_benchmark(
        "rounds.py", "--quick", "--no-nodes", "--writers", str(WRITERS), "--ledger-s", "0.3",
        "--ledger-tx", str(MAX_TX), "--sim-nodes", "8,30", timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert "error" not in figures, figures
    assert figures["writers"] == WRITERS and figures["sim_sizes"] == [8, 30]

    # the ledger: every append is an entry that verifies, none beyond the bound
    appended = figures["ledger_tx"]
    assert 0 < appended <= WRITERS * MAX_TX
    assert figures["ledger_funding_entries"] == WRITERS
    assert figures["ledger_entries_verified"] == 1 + WRITERS + appended + figures[
        "ledger_tx_late"]
    assert figures["ledger_writer_tx_min"] <= appended / WRITERS <= figures[
        "ledger_writer_tx_max"]
    assert 0 < figures["raw_sqlite_tx"] <= WRITERS * MAX_TX
    assert figures["entry_bytes"] > 64 + 32 + 32  # a signature, a key and a hash at least
    for name in ("ledger", "raw_sqlite"):
        rate = figures[f"{name}_tx_per_s"]
        assert close(rate, figures[f"{name}_tx"] / figures[f"{name}_s"]), name
        assert figures[f"{name}_cpu_ms_per_tx"] > 0, name
    assert close(figures["ledger_ratio"],
                 figures["ledger_tx_per_s"] / figures["raw_sqlite_tx_per_s"])

    # the simulation: the same figures as running it here
    for n in (8, 30):
        one, three = simulate(n, 1), simulate(n, 3)
        assert figures[f"chain_bytes_per_round_{n}"] == round(
            (three["tx_bytes"] - one["tx_bytes"]) / 2)
        assert figures[f"audit_coverage_{n}"] == 1.0
        cpu = figures[f"round_cpu_s_{n}"]
        assert 0 < cpu < figures[f"sim_cpu_s_{n}_rounds_3"]
    assert figures["chain_bytes_per_round_8"] < figures["chain_bytes_per_round_30"]

    assert figures["round_overhead_ms"] is None and "round_overhead_note" in figures
    assert list(tmp_path.iterdir()) == []
    assert processes_mentioning(str(tmp_path)) == []


def test_benchmark_takes_its_size_arguments() -> None:
    done = run_script("rounds.py", "--help", timeout=30)
    for flag in ("--writers", "--ledger-s", "--ledger-tx", "--sim-nodes", "--rounds",
                 "--no-nodes", "--quick"):
        assert flag in done.stdout, flag
