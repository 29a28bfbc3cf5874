# A task keeps running through a store outage: two node processes on one embedded ledger;
# one is SIGKILLed, so the survivor's own store writes and reads (the distribution list it
# stores as the only submitter left, the lists it reads to claim) fall short of a quorum for a
# while (two members: no fallback holds a hint). Its task must not stop: the failed steps are
# counted and tried again, and once the other node is back both submit and are paid again.
from __future__ import annotations

import signal

from process_helpers import NodeProcess, boot_on_ledger, ledger_state, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
TASK = "hello"


def test_a_task_survives_its_store_falling_short_of_a_quorum(processes, tmp_path):
    ledger_dir = tmp_path / "ledger"
    boot, addr, common = boot_on_ledger(processes, ledger_dir, "--round-time", "3")
    other = processes.node("n1", "--join", addr, *common)
    ids = [wait_for(node.announced, 30, "both nodes to start")[0] for node in (boot, other)]

    def both_submitted() -> list[int]:
        task = ledger_state(ledger_dir).tasks.get(TASK)
        return [] if task is None else [
            r for r, rs in task.rounds.items() if set(ids) <= set(rs.submissions)]

    wait_for(both_submitted, 90, "a round both nodes submitted in")
    other.proc.send_signal(signal.SIGKILL)
    other.proc.wait()

    def steps_failed() -> int:
        tasks = ((boot.status() or {}).get("tasks") or {}).get("tasks") or {}
        hello = tasks.get(TASK)
        return int(((hello or {}).get("metrics") or {}).get("steps_failed", 0))

    wait_for(steps_failed, 60, "a step of the survivor's task to fail on its store")
    failed_at = max(ledger_state(ledger_dir).tasks[TASK].rounds)
    assert "stopped" not in boot.stdout(), boot.stdout()[-2000:]

    processes.node("n1-again", "--join", addr, *common, data_dir=other.data_dir)

    def paid_since_restart() -> bool:
        rounds = ledger_state(ledger_dir).tasks[TASK].rounds
        return any(r > failed_at and rs.paid and set(ids) <= set(rs.submissions)
                   for r, rs in rounds.items())

    wait_for(paid_since_restart, 120, "a round both submitted in paid after the restart")
    assert "stopped" not in boot.stdout(), boot.stdout()[-2000:]
