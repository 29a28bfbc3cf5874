# Smoke test of benchmarks/chain.py: at its --quick sizes it prints one JSON line whose figures
# agree with each other (rates with the counts and seconds they come from, ratios with the
# rates, each per-node gas figure with its formula, gas ordered as the contract's work is) and
# it leaves no anvil behind. anvil is required: without it the test fails. No speed and no gas
# bound is checked here (tests/test_evm_contract.py bounds the gas).
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from chain.evm.anvil import find_anvil

from bench_helpers import processes_mentioning, run_benchmark, run_script

NODES = [6, 10]  # the --quick sizes
LISTS = [100, 1000]
SETTLE_NODES = 10
MARK = "TASKNET_CHAIN_BENCH_RUN"


def close(measured: float, expected: float) -> bool:
    """Equal but for the rounding of the printed figures (seconds have 3 decimals, so a rate
    from a 0.05 s phase is off by 1% and more)."""
    return abs(measured - expected) <= 0.002 + 0.05 * abs(expected)


def carries(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone
        return False


def is_anvil(pid: int) -> bool:
    try:
        return b"anvil" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def check_gas(f: dict[str, Any]) -> None:
    submit, first = f["evm_gas_submit"], f["evm_gas_first_submit"]
    assert 0 < submit < first
    assert 0 < f["evm_gas_submit_new_node"] and 0 < f["evm_gas_stake"]
    for n in NODES:  # submit gas does not depend on the round's size
        assert abs(f[f"evm_gas_submit_at_{n}"] - submit) <= 0.01 * submit, n
        assert f[f"evm_gas_submit_at_{n}"] < f[f"evm_gas_first_submit_at_{n}"]
    assert f["evm_gas_submit_at_6"] == submit and f["evm_gas_first_submit_at_6"] == first
    assert f["evm_gas_distribution"] == f["evm_gas_distribution_at_6"]
    assert f["evm_gas_payout"] == f["evm_gas_payout_at_6"]
    assert min(f["evm_gas_distribution"], f["evm_gas_distribution_vote"],
               f["evm_gas_payout"]) > 0
    assert f["evm_gas_audit_no_votes"] == 0 and f["evm_gas_audit_no_votes_note"]
    assert f["evm_gas_negative_votes_5"] > f["evm_gas_negative_votes_1"] > (
        f["evm_gas_audit_empty_list_if_sent"]) > 0

    # claims: longer proofs from longer lists cost more
    sizes = sorted(NODES + LISTS)
    claims = [f[f"evm_gas_claim_{n}"] for n in sizes]
    hashes = [f[f"evm_claim_proof_hashes_{n}"] for n in sizes]
    assert claims == sorted(claims) and len(set(claims)) == len(claims), claims
    assert hashes == sorted(hashes) and 0 < hashes[0], hashes
    assert f["evm_gas_claim_1000"] > f["evm_gas_claim_100"]

    # each per-node figure is its formula over the printed parts
    for n in NODES:
        mean = f[f"evm_gas_submit_mean_{n}"]
        assert f[f"evm_gas_submit_at_{n}"] <= mean <= f[f"evm_gas_first_submit_at_{n}"], n
        expected = mean + (f[f"evm_gas_distribution_at_{n}"] + f[f"evm_gas_payout_at_{n}"]) / n \
            + f[f"evm_gas_claim_{n}"]
        assert abs(f[f"evm_gas_per_node_round_{n}"] - expected) <= 1, n
    largest = max(NODES)
    for n in LISTS:
        mean = f[f"evm_gas_submit_mean_{n}"]
        assert abs(mean - (first + (n - 1) * submit) / n) <= 0.1, n
        expected = mean + (f[f"evm_gas_distribution_at_{largest}"]
                           + f[f"evm_gas_payout_at_{largest}"]) / n + f[f"evm_gas_claim_{n}"]
        assert abs(f[f"evm_gas_per_node_round_{n}"] - expected) <= 1, n
        assert f[f"evm_gas_distribution_list_{n}"] > 0


def check_throughput(f: dict[str, Any]) -> None:
    count = f["throughput_tx_per_phase"] * f["throughput_repeats"]
    for name in ("evm_settle", "raw", "evm_settle_sync"):
        assert f[f"{name}_tx"] == count, name
        assert f[f"{name}_s"] > 0, name
        assert close(f[f"{name}_tx_per_s"], f[f"{name}_tx"] / f[f"{name}_s"]), name
        phases = f[f"{name}_tx_per_s_phases"]
        assert len(phases) == f["throughput_repeats"], name
        assert min(phases) * 0.99 <= f[f"{name}_tx_per_s"] <= max(phases) * 1.01, name
    assert close(f["evm_ratio"], f["evm_settle_tx_per_s"] / f["raw_tx_per_s"])
    assert close(f["evm_sync_ratio"], f["evm_settle_sync_tx_per_s"] / f["raw_tx_per_s"])


def check_settle(f: dict[str, Any]) -> None:
    n = SETTLE_NODES
    assert f["round_settle_nodes"] == n
    assert f["round_settle_round_time_s"] == f["round_settle_window_s"] + 2
    submitted = f[f"round_settle_submitted_{n}"]
    assert 0 < submitted <= n
    assert 1 <= f[f"round_settle_submit_blocks_{n}"] <= submitted
    total, wait = f[f"round_settle_s_{n}"], f[f"round_settle_wait_s_{n}"]
    assert 0 < wait <= f["round_settle_round_time_s"] + 0.05  # sent once round 1 opened
    assert abs(total - (wait + f[f"round_settle_distribution_s_{n}"])) <= 0.002
    assert 0 < f[f"round_settle_submit_p50_s_{n}"] <= f[f"round_settle_submit_max_s_{n}"]
    assert f[f"round_settle_submit_max_s_{n}"] <= f[f"round_settle_submit_span_s_{n}"] + 0.002
    assert f[f"round_settle_submit_span_s_{n}"] < total


def test_quick_run() -> None:
    find_anvil()  # AnvilError (a failure, not a skip) when anvil is not installed
    marker = f"{MARK}={uuid.uuid4().hex}"
    name, value = marker.split("=")
    figures = run_benchmark("chain.py", "--quick", timeout=55,
                            env={**os.environ, name: value})
    assert "error" not in figures, figures
    assert figures["bench"] == "chain" and figures["anvil_version"].startswith("anvil")
    assert figures["evm_nodes"] == NODES and figures["evm_lists"] == LISTS
    assert figures["evm_max_auditors"] == 5
    check_gas(figures)
    check_throughput(figures)
    check_settle(figures)

    # nothing left running: neither the anvils it started nor any process it spawned
    pids = figures["anvil_pids"]
    assert len(pids) == 2 + 3 * figures["throughput_repeats"]  # gas, settle, each phase
    assert [pid for pid in pids if is_anvil(pid)] == []
    left = [pid for pid in processes_mentioning("anvil") if carries(pid, marker.encode())]
    assert left == []
    assert [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if pid != os.getpid() and carries(pid, marker.encode())] == []


def test_benchmark_takes_its_size_arguments() -> None:
    done = run_script("chain.py", "--help", timeout=30)
    for flag in ("--quick", "--nodes", "--lists", "--claimers", "--tx", "--repeats",
                 "--settle-nodes", "--settle-window"):
        assert flag in done.stdout, flag
