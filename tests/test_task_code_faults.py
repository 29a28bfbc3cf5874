# Task code a node does not ship with, installed with --task-module and created on the chain
# from a task file (`node.py task create --file`): three node processes run it; on one of them
# it raises, hangs past its window or returns an oversized submission in turn. That node's
# round fails cleanly each time (no submission, nothing sent twice, the node stays up) and the
# others are paid every round. `node.py task claim` answers for a round already claimed.
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from process_helpers import NodeProcess, boot_on_ledger, ledger_state, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
MODULE = str(Path(__file__).with_name("tasks_for_tests") / "echo.py")
TASK_FILE = """\
name = "echo"
task_id = "echo-1"
round_time_s = 3
min_stake = 100
bounty_per_round = 300
fund = 100000
start_in_s = 1
"""


def test_faulty_task_code_fails_its_node_s_round_only(processes: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ledger_dir = tmp_path / "ledger"
    boot, addr, common = boot_on_ledger(processes, ledger_dir, "--task-module", MODULE)
    n1 = processes.node("n1", "--join", addr, *common)
    monkeypatch.setenv("TASKNET_TEST_FAULT", "1")
    n2 = processes.node("n2", "--join", addr, *common)
    monkeypatch.delenv("TASKNET_TEST_FAULT")
    ids = {name: wait_for(node.announced, 30, f"{name} to start")[0]
           for name, node in {"n0": boot, "n1": n1, "n2": n2}.items()}
    wait_for(lambda: len((boot.status() or {}).get("members", [])) == 3, 30, "three members")
    (tmp_path / "echo.toml").write_text(TASK_FILE)
    created = boot.cli("task", "create", "--file", str(tmp_path / "echo.toml"))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["task_id"] == "echo-1"
    again = boot.cli("task", "create", "--file", str(tmp_path / "echo.toml"))
    assert again.returncode == 2 and "task_exists" in again.stderr

    def rounds() -> dict[int, Any]:
        task = ledger_state(ledger_dir).tasks.get("echo-1")
        return {} if task is None else dict(task.rounds)

    # start counting at the first round both honest nodes submitted in
    first = min(wait_for(lambda: [r for r, rs in rounds().items()
                                  if {ids["n0"], ids["n1"]} <= set(rs.submissions)],
                         60, "a round the honest nodes submitted in"))
    wait_for(lambda: len([r for r, rs in rounds().items() if r >= first and rs.paid
                          and {ids["n0"], ids["n1"]} <= rs.claimed]) >= 4, 120,
             "four rounds paid and claimed by the honest nodes")
    task = ledger_state(ledger_dir).tasks["echo-1"]
    settled = sorted(r for r, rs in task.rounds.items() if r >= first and rs.paid)
    for r in settled:
        rs = task.rounds[r]
        assert {ids["n0"], ids["n1"]} <= set(rs.submissions), r
        assert ids["n2"] not in rs.submissions, (r, rs.submissions.get(ids["n2"]))
    # the faulty node stayed up and counted its failures; it never submitted twice
    assert n2.proc.poll() is None
    status = wait_for(n2.status, 10, "n2's status")
    metrics = status["tasks"]["tasks"]["echo-1"]["metrics"]
    assert metrics["work_failed"] >= 1 and metrics["submissions"] == 0, metrics
    # each kind of failure happened, and was reported as such
    out = n2.stdout()
    assert "work failed (RuntimeError: task code failing on purpose)" in out, out
    assert "(timeout)" in out, out
    assert "oversized: submission is" in out, out
    # a claim for a round the node claimed already is refused, with the chain's reason
    claimed = boot.cli("task", "claim", "echo-1", str(settled[0]))
    assert claimed.returncode == 2 and "already_claimed" in claimed.stderr, claimed.stderr
    for node in (boot, n1, n2):
        node.proc.send_signal(signal.SIGTERM)
    for node in (boot, n1, n2):
        assert node.proc.wait(timeout=30) in (0, 1)
