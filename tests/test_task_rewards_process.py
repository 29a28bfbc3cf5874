# A node's rewards in its JSON API with real node processes (three) on one embedded ledger
# (127.0.0.1): after a restart /status still has the rewards it claimed per round (rebuilt from
# the chain and the stored lists, not kept in memory); rounds paid while it was down for longer
# than the engine looks back are claimable, in /tasks, /tasks/{id}, /wallet and the `tasks`
# table, by exactly what `node.py task claim` then moves into its balance on the chain; once
# claimed they are charted and no longer claimable. The book itself: test_tasks_rewards.py.
from __future__ import annotations

import json
import signal
from typing import Any

from chain.rules import ChainState, rejected_of
from tasks.engine import lookback

from process_helpers import (
    JsonApi,
    NodeProcess,
    boot_on_ledger,
    ledger_state,
    processes_fixture,
    wait_for,
)

processes = processes_fixture(NodeProcess)
ROUND_TIME = "3"
TASK = "hello"


def _get(node: NodeProcess, path: str) -> Any:
    """GET `path` of the node's API (api.json read afresh: a restarted node has a new port);
    None while it does not answer 200."""
    api = JsonApi(node.data_dir, timeout=5)
    try:
        status, answer = api.call("GET", path)
    except OSError:
        return None
    finally:
        api.close()
    return answer if status == 200 else None


def _rewards(node: NodeProcess) -> dict[str, int]:
    status = node.status()
    task = ((status or {}).get("tasks") or {}).get("tasks", {}).get(TASK) or {}
    return task.get("rewards_by_round") or {}


def _owed(state: ChainState, account: str) -> dict[int, int]:
    """Round -> the account's equal share, for the paid rounds it was accepted in and has
    not claimed, from the chain alone."""
    owed = {}
    for r, rs in state.tasks[TASK].rounds.items():
        if rs.paid and account in rs.submissions and account not in rs.claimed \
                and account not in rejected_of(state.tasks[TASK], r, rs):
            accepted = set(rs.submissions) - rejected_of(state.tasks[TASK], r, rs)
            owed[r] = rs.attempts[rs.accepted_attempt].total // len(accepted)
    return owed


def test_rewards_survive_a_restart_and_missed_rounds_are_claimable(processes, tmp_path):
    ledger_dir = tmp_path / "ledger"
    boot, addr, common = boot_on_ledger(processes, ledger_dir, "--round-time", ROUND_TIME)
    # three nodes: with one down the store still has a quorum (two of its three copies)
    node, other = (processes.node(name, "--join", addr, *common) for name in ("n1", "n2"))
    me = wait_for(node.peer_id, 30, "n1 to start")
    wait_for(other.peer_id, 30, "n2 to start")

    claimed = wait_for(lambda: _rewards(node), 120, "n1 to claim a reward")
    assert all(amount > 0 for amount in claimed.values())
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(timeout=30)
    submitted = [r for r, rs in ledger_state(ledger_dir).tasks[TASK].rounds.items()
                 if me in rs.submissions]
    state = ledger_state(ledger_dir)
    cfg = state.tasks[TASK].config
    # down until the engine no longer looks at any round it submitted for, and those are paid
    past = max(submitted) + lookback(cfg) + 2

    def missed_rounds_paid() -> dict[int, int]:
        listing = _get(boot, "/tasks") or {"tasks": []}
        now = next((t["round"] for t in listing["tasks"] if t["task_id"] == TASK), None)
        owed = _owed(ledger_state(ledger_dir), me)
        return owed if now is not None and now > past and owed else {}
    owed = wait_for(missed_rounds_paid, 120, "rounds n1 missed to be paid and out of reach")
    assert max(owed) <= max(submitted)

    node = processes.node("n1-again", "--join", addr, *common, data_dir=node.data_dir)
    # what it claimed before is charted again without a new claim for those rounds
    wait_for(lambda: set(claimed) <= set(_rewards(node)) and all(
        _rewards(node)[r] == amount for r, amount in claimed.items()), 60,
        "the restarted node's rewards per round to come back")

    # what it can claim: the missed rounds' shares, the same in every answer
    expected = sum(owed.values())

    def shown() -> bool:
        row = next((t for t in (_get(node, "/tasks") or {"tasks": []})["tasks"]
                    if t["task_id"] == TASK), {})
        one = _get(node, f"/tasks/{TASK}") or {}
        wallet = _get(node, "/wallet") or {}
        return row.get("claimable") == one.get("claimable") == expected \
            == wallet.get("claimable", {}).get(TASK)
    wait_for(shown, 60, f"claimable {expected} in /tasks, /tasks/{TASK} and /wallet")
    table = node.cli("tasks", check=True).stdout.splitlines()
    column = table[0].index("CLAIMABLE")
    row = next(line for line in table if line.startswith(TASK + " "))
    assert row[:column + len("CLAIMABLE")].split()[-1] == str(expected), table

    # `node.py task claim` takes exactly that into the balance; then it is charted, not owed
    balance = ledger_state(ledger_dir).balances[me]
    for r, amount in sorted(owed.items()):
        answer = json.loads(node.cli("task", "claim", TASK, str(r), check=True).stdout)
        assert answer == {"ok": True, "round": r, "amount": amount}
    assert ledger_state(ledger_dir).balances[me] - balance >= expected
    after = _get(node, f"/tasks/{TASK}")
    assert all(after["rewards_by_round"][str(r)] == amount for r, amount in owed.items())
    # (a round paid just now may be owed for a moment, until the node claims it by itself)
    wait_for(lambda: (_get(node, f"/tasks/{TASK}") or {}).get("claimable") == 0, 30,
             "nothing left to claim")
    for process in (boot, node, other):
        process.proc.send_signal(signal.SIGTERM)
    for process in (boot, node, other):
        process.proc.wait(timeout=30)
