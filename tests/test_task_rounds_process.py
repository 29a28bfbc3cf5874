# Task rounds end to end with real node processes on one embedded ledger (127.0.0.1): honest
# nodes are paid for the rounds they submitted in, a node that submits garbage is slashed and
# unpaid, a node that votes everything invalid harms nobody, a bad distribution list is voted
# down and a later one pays, a node that never submits is simply unpaid,
# a node SIGKILLed mid-round resumes without submitting twice, and
# the ledger file verifies afterwards.
from __future__ import annotations

import signal
from pathlib import Path

from chain.ledger import LEDGER_FILE_NAME, Ledger
from chain.rules import rejected_of

from process_helpers import NodeProcess, boot_on_ledger, ledger_state, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
ROUND_TIME = "3"
TASK = "hello"


def _settled_rounds(ledger_dir: Path) -> dict[int, object]:
    task = ledger_state(ledger_dir).tasks.get(TASK)
    if task is None:
        return {}
    return {r: rs for r, rs in task.rounds.items() if rs.paid}  # paid: audits are over


def test_rounds_pay_honest_nodes_and_slash_a_cheat(processes, tmp_path):
    ledger_dir = tmp_path / "ledger"
    boot, addr, common = boot_on_ledger(processes, ledger_dir, "--round-time", ROUND_TIME)
    modes = {"n1": None, "n2": "wrong-submission", "n3": "false-audit",
             "n4": "bad-distribution", "n5": "no-submission"}
    nodes = {"n0": boot}
    for name, mode in modes.items():
        extra = ("--misbehave", mode) if mode else ()
        nodes[name] = processes.node(name, "--join", addr, *common, *extra)
    ids = {name: wait_for(node.announced, 30, f"{name} to start")[0]
           for name, node in nodes.items()}

    workers = {name: peer for name, peer in ids.items() if name != "n5"}  # n5 never submits

    def everyone_submitted() -> list[int]:
        task = ledger_state(ledger_dir).tasks.get(TASK)
        return [] if task is None else [
            r for r, rs in task.rounds.items() if set(workers.values()) <= set(rs.submissions)]

    first = min(wait_for(everyone_submitted, 90, "a round every node submitted in"))

    # kill n1 in a submission window, restart it: it resumes without a second submission
    n1 = nodes["n1"]
    n1.proc.send_signal(signal.SIGKILL)
    n1.proc.wait()
    killed_at = max(ledger_state(ledger_dir).tasks[TASK].rounds)
    nodes["n1"] = processes.node("n1-again", "--join", addr, *common, data_dir=n1.data_dir)

    def resumed() -> bool:
        rounds = ledger_state(ledger_dir).tasks[TASK].rounds
        return any(r > killed_at + 1 and ids["n1"] in rs.submissions
                   for r, rs in rounds.items())

    wait_for(resumed, 90, "the restarted node to submit again")
    wait_for(lambda: len([r for r in _settled_rounds(ledger_dir) if r >= first]) >= 6, 120,
             "six paid rounds after everyone joined")

    state = ledger_state(ledger_dir)
    task = state.tasks[TASK]
    rounds = {r: rs for r, rs in task.rounds.items() if r >= first and rs.paid}
    honest = [ids["n0"], ids["n1"], ids["n3"], ids["n4"]]
    for r, rs in rounds.items():
        # the cheat is rejected whenever it submitted; no honest node ever is
        rejected = rejected_of(task, r, rs)
        if ids["n2"] in rs.submissions:
            assert ids["n2"] in rejected, (r, rejected)
        assert not set(honest) & rejected, (r, rejected)
        assert ids["n2"] not in rs.claimed
        # the inflated list of the bad distributor never pays
        accepted = rs.attempts[rs.accepted_attempt]
        for attempt in rs.attempts.values():
            if attempt.distributor == ids["n4"]:
                assert attempt is not accepted  # the inflated list never pays
    # every honest node claims for every settled round it submitted in (claims come a round
    # or two after payout, later for a round whose list was accepted at a later attempt:
    # look at the rounds that are not the newest, and give the claims time to land)
    older = sorted(rounds)[:-2]
    assert older, "no settled rounds old enough to have their claims"

    def unclaimed() -> list[tuple[int, str]]:
        now = ledger_state(ledger_dir).tasks[TASK].rounds
        return [(r, account) for r in older for account in honest
                if account in now[r].submissions and account not in now[r].claimed]

    wait_for(lambda: not unclaimed(), 60, "every honest node's claims of the older rounds")
    # the node that does not submit is neither paid nor slashed: it is simply not there
    task = state.tasks[TASK]
    assert all(ids["n5"] not in rs.submissions for rs in task.rounds.values())
    assert all(ids["n5"] not in rs.slashed for rs in task.rounds.values())
    assert task.stakes.get(ids["n5"], 0) >= task.config.min_stake
    # the cheat lost stake to slashing: the slashed pool holds it
    assert state.slashed_pool > 0
    for node in nodes.values():
        node.proc.send_signal(signal.SIGTERM)
    for node in nodes.values():
        node.proc.wait(timeout=30)
    entries = Ledger.verify_file(ledger_dir / LEDGER_FILE_NAME)
    assert entries > 20
    out = nodes["n0"].stdout()
    assert "round " in out and f"{TASK}: submitted" in out
