# The settlement rules (chain/rules.py) against docs/task-rounds.md: every refusal reason is
# reachable and leaves the state byte-for-byte unchanged; five nodes go through rounds of
# work, audit, slashing, a rejected and an accepted distribution, payout, claims and unstake;
# a random walk of transactions keeps funds conserved and the state encodable.
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chain import (
    REASONS,
    ChainState,
    Refused,
    TaskConfig,
    account_view,
    apply,
    distributor_of,
    genesis,
    round_view,
    task_view,
)
from chain.assignment import audit_seed, distribution_order
from chain.merkle import distribution_proofs, distribution_root
from chain.rules import rejected_of

NODES = ["A", "B", "C", "D", "E"]
OWNER = "owner"
RICH = "rich"
TASK = "t1"
CODE_HASH = bytes(range(32))
# round r starts at 100 + 10 r: submission window [+0, +4), audit [+4, +8), idle [+8, +10)
START, ROUND, SUB, AUD = 100, 10, 4, 4


def slot_in(r: int, window: str, offset: int = 0) -> int:
    base = START + r * ROUND
    return base + {"submission": 0, "audit": SUB, "idle": SUB + AUD}[window] + offset


@dataclass
class Net:
    """A chain state and a client that numbers each sender's transactions."""

    state: ChainState
    supply: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.supply = self.state.total_supply()

    def tx(self, sender: str, op: str, **fields: Any) -> dict[str, Any]:
        return {"op": op, "nonce": self.state.nonces.get(sender, 0), **fields}

    def send(self, sender: str, slot: int, op: str, **fields: Any) -> dict[str, Any]:
        result = apply(self.state, sender, self.tx(sender, op, **fields), slot)
        assert self.state.total_supply() == self.supply
        self.log.append(result)
        return result

    def refused(self, sender: str, slot: int, op: str, **fields: Any) -> str:
        before = self.state.to_bytes()
        with pytest.raises(Refused) as caught:
            apply(self.state, sender, self.tx(sender, op, **fields), slot)
        assert self.state.to_bytes() == before
        assert caught.value.reason in REASONS
        return caught.value.reason

    def copy(self) -> Net:
        return Net(self.state.copy())


def task_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task_id": TASK,
        "name": "count words",
        "code_hash": CODE_HASH,
        "round_time": ROUND,
        "submission_window": SUB,
        "audit_window": AUD,
        "min_stake": 50,
        "bounty_per_round": 100,
        "start_slot": START,
    }
    fields.update(overrides)
    return fields


def new_net() -> Net:
    net = Net(genesis({**{n: 1_000 for n in NODES}, OWNER: 100_000, RICH: 5_000}))
    net.send(OWNER, 0, "create_task", **task_fields())
    net.send(OWNER, 1, "fund", task_id=TASK, amount=1_000)
    for node in NODES:
        net.send(node, 2, "stake", task_id=TASK, amount=100)
    return net


def accepted_of(net: Net, r: int, slot: int) -> list[str]:
    view = round_view(net.state, TASK, r, slot)
    assert view["accepted"] is not None
    return list(view["accepted"])


# --- the happy path, with one cheat and one bad distribution ---


def test_five_nodes_through_the_rounds() -> None:
    net = new_net()
    assert net.state.tasks[TASK].pool == 1_000
    # round 1: everyone submits the work of round 0; E cheats
    for node in NODES:
        net.send(node, slot_in(1, "submission"), "submit", task_id=TASK, round=0,
                 submission="bad" if node == "E" else f"cid-{node}")  # fmt: skip
    view = round_view(net.state, TASK, 0, slot_in(1, "audit"))
    assert view["k"] == 4 and view["rejected"] is None
    assert all(len(auditors) == 4 for auditors in view["auditors"].values())
    # round 1 audit window: three honest auditors find E invalid; E accuses A in revenge
    for node in ["A", "B", "C"]:
        net.send(node, slot_in(1, "audit"), "audit", task_id=TASK, round=0, invalid=["E"])
    net.send("D", slot_in(1, "audit"), "audit", task_id=TASK, round=0, invalid=[])
    net.send("E", slot_in(1, "audit", 1), "audit", task_id=TASK, round=0, invalid=["A"])
    # round 2: the work of round 1 is submitted too (rounds overlap); E's next submission
    # settles its round 0 first: 70% of its stake goes, and what is left is below min_stake
    for node in NODES[:4]:
        net.send(node, slot_in(2, "submission"), "submit", task_id=TASK, round=1,
                 submission=f"cid1-{node}")  # fmt: skip
    assert net.refused("E", slot_in(2, "submission"), "submit", task_id=TASK, round=1,
                       submission="cid1-E") == "not_staked"  # fmt: skip
    # the results are final; E's cut is taken when E next stakes, unstakes or submits
    projected = round_view(net.state, TASK, 0, slot_in(2, "submission"))
    assert projected["rejected"] == ["E"] and projected["slashed"] == {"E": 70}
    assert projected["settled"] and net.state.tasks[TASK].stakes["E"] == 100
    seed = projected["seed"]
    accepted = ["A", "B", "C", "D"]
    assert projected["accepted"] == accepted
    submitters = projected["submitters"]
    assert submitters == NODES  # in the order they were included
    first, second = distributor_of(seed, submitters, 0), distributor_of(seed, submitters, 1)
    assert "E" not in (first, second)  # (a rejected distributor's turn would pass unsent)
    assert projected["current_distributor"] == first
    other = next(n for n in accepted if n not in (first, second))
    # attempt 0: the distributor keeps the bounty for itself
    greedy = {first: 100}
    assert net.refused(other, slot_in(2, "submission"), "submit_distribution", task_id=TASK,
                       round=0, root=distribution_root(greedy), total=100, cid="x") == (
        "not_distributor")  # fmt: skip
    result = net.send(first, slot_in(2, "submission", 1), "submit_distribution", task_id=TASK,
                      round=0, root=distribution_root(greedy), total=100, cid="greedy")  # fmt: skip
    assert result["attempt"] == 0
    # the other accepted submitters vote it down; E (rejected) may not vote
    voters = [n for n in accepted if n != first]
    for node in voters[:2]:
        net.send(node, slot_in(2, "audit"), "audit_distribution", task_id=TASK, round=0)
    assert net.refused("E", slot_in(2, "audit"), "audit_distribution", task_id=TASK,
                       round=0) == "slashed"  # fmt: skip
    assert net.refused(first, slot_in(2, "audit"), "audit_distribution", task_id=TASK,
                       round=0) == "not_auditor"  # fmt: skip
    assert net.refused(OWNER, slot_in(2, "idle"), "payout", task_id=TASK,
                       round=0) == "no_distribution"  # fmt: skip
    view = round_view(net.state, TASK, 0, slot_in(2, "idle"))
    assert [a["status"] for a in view["attempts"]] == ["rejected"]
    # round 3: the turn passes to the second distributor; a fair list
    assert round_view(net.state, TASK, 0, slot_in(3, "submission"))["current_distributor"] == (
        second
    )
    fair = {n: 25 for n in accepted}
    assert net.refused(first, slot_in(3, "submission"), "submit_distribution", task_id=TASK,
                       round=0, root=distribution_root(fair), total=100, cid="f") == (
        "not_distributor")  # fmt: skip
    net.send(second, slot_in(3, "submission"), "submit_distribution", task_id=TASK, round=0,
             root=distribution_root(fair), total=100, cid="fair")  # fmt: skip
    lone_voter = next(n for n in accepted if n != second)
    net.send(lone_voter, slot_in(3, "audit"), "audit_distribution", task_id=TASK, round=0)
    assert net.refused(OWNER, slot_in(3, "audit", 1), "payout", task_id=TASK,
                       round=0) == "not_ready"  # fmt: skip
    paid = net.send(RICH, slot_in(3, "idle"), "payout", task_id=TASK, round=0)
    assert paid["total"] == 100 and paid["attempt"] == 1
    assert net.state.tasks[TASK].pool == 900
    assert net.refused(OWNER, slot_in(3, "idle"), "payout", task_id=TASK,
                       round=0) == "already_paid"  # fmt: skip
    # claims
    proofs = distribution_proofs(fair)
    claim_slot = slot_in(4, "audit")
    assert net.refused("A", claim_slot, "claim", task_id=TASK, round=0, amount=26,
                       proof=proofs["A"]) == "bad_proof"  # fmt: skip
    assert net.refused("E", claim_slot, "claim", task_id=TASK, round=0, amount=25,
                       proof=proofs["A"]) == "slashed"  # fmt: skip
    for node in accepted:
        before = net.state.balances[node]
        net.send(node, claim_slot, "claim", task_id=TASK, round=0, amount=25, proof=proofs[node])
        assert net.state.balances[node] == before + 25
    assert net.refused("A", claim_slot, "claim", task_id=TASK, round=0, amount=25,
                       proof=proofs["A"]) == "already_claimed"  # fmt: skip
    view = round_view(net.state, TASK, 0)
    assert view["claimable"] == 0 and view["claimed"] == accepted and view["paid"]
    assert view["accepted_attempt"] == 1
    # unstake: the last submissions were made in round 2, so from round 4; A's round 1 is
    # still pending: the unstake settles it first
    assert net.refused("A", slot_in(3, "idle"), "unstake", task_id=TASK,
                       amount=10) == "stake_locked"  # fmt: skip
    result = net.send("A", slot_in(4, "submission"), "unstake", task_id=TASK, amount=100)
    assert result["settled"] == 1 and "slashed" not in result
    assert "A" not in net.state.tasks[TASK].pending
    # E's round 0 is settled by its unstake: the cut comes off before the amount is checked
    assert net.refused("E", slot_in(4, "submission"), "unstake", task_id=TASK,
                       amount=31) == "insufficient_balance"  # fmt: skip
    result = net.send("E", slot_in(4, "submission"), "unstake", task_id=TASK, amount=30)
    assert result["settled"] == 0 and result["slashed"] == 70
    assert net.state.slashed_pool == 70 and net.state.tasks[TASK].rounds[0].slashed == {"E": 70}
    assert "E" not in net.state.tasks[TASK].stakes
    assert account_view(net.state, "A")["stakes"] == {}
    assert account_view(net.state, "B")["stakes"] == {TASK: 100}
    # after all that, the books balance and the state survives its own encoding
    assert net.state.total_supply() == net.supply
    assert ChainState.from_bytes(net.state.to_bytes()) == net.state
    tv = task_view(net.state, TASK)
    assert tv["pool"] == 900 and tv["rounds"] == [0, 1] and tv["unpaid_rounds"] == [1]


def test_a_missing_distributor_passes_the_turn_and_attempts_run_out() -> None:
    net = new_net()
    net.send(OWNER, 3, "create_task", **task_fields(task_id="t2", allowed_failed_distributions=1))
    net.send(OWNER, 4, "fund", task_id="t2", amount=500)
    for node in NODES[:3]:
        net.send(node, 5, "stake", task_id="t2", amount=60)
        net.send(node, slot_in(1, "submission"), "submit", task_id="t2", round=0, submission=node)
    view = round_view(net.state, "t2", 0, slot_in(3, "submission"))
    second = view["current_distributor"]
    assert view["current_attempt"] == 1 and second == view["distributors"][1]
    listing = {n: 10 for n in NODES[:3]}
    root = distribution_root(listing)
    net.send(second, slot_in(3, "submission"), "submit_distribution", task_id="t2", round=0,
             root=root, total=30, cid="c")  # fmt: skip
    for voter in [n for n in NODES[:3] if n != second]:
        net.send(voter, slot_in(3, "audit"), "audit_distribution", task_id="t2", round=0)
    # attempt 1 was the last one allowed: the round pays nothing, the bounty stays in the pool
    assert net.refused(view["distributors"][2], slot_in(4, "submission"), "submit_distribution",
                       task_id="t2", round=0, root=root, total=30, cid="c") == (
        "outside_window")  # fmt: skip
    assert net.refused(RICH, slot_in(4, "idle"), "payout", task_id="t2",
                       round=0) == "no_distribution"  # fmt: skip
    assert net.state.tasks["t2"].pool == 500


def test_a_lone_submitter_cannot_be_rejected_and_distributes_alone() -> None:
    net = new_net()
    net.send("A", slot_in(1, "submission"), "submit", task_id=TASK, round=0, submission="x")
    view = round_view(net.state, TASK, 0, slot_in(1, "audit"))
    assert view["k"] == 0 and view["auditors"] == {"A": []}
    assert net.refused("A", slot_in(1, "audit"), "audit", task_id=TASK, round=0,
                       invalid=["A"]) == "not_auditor"  # fmt: skip
    listing = {"A": 100}
    net.send("A", slot_in(2, "submission"), "submit_distribution", task_id=TASK, round=0,
             root=distribution_root(listing), total=100, cid="c")  # fmt: skip
    net.send("B", slot_in(2, "idle"), "payout", task_id=TASK, round=0)
    net.send("A", slot_in(2, "idle"), "claim", task_id=TASK, round=0, amount=100,
             proof=distribution_proofs(listing)["A"])  # fmt: skip
    assert net.state.balances["A"] == 1_000 - 100 + 100


def test_a_list_that_sums_over_its_total_cannot_pay_more_than_the_total() -> None:
    net = new_net()
    for node in ["A", "B"]:
        net.send(node, slot_in(1, "submission"), "submit", task_id=TASK, round=0, submission="x")
    seed = round_view(net.state, TASK, 0)["seed"]
    distributor = distributor_of(seed, ["A", "B"], 0)  # in the order they submitted
    listing = {"A": 80, "B": 80}  # sums to 160 but claims total 100
    net.send(distributor, slot_in(2, "submission"), "submit_distribution", task_id=TASK,
             round=0, root=distribution_root(listing), total=100, cid="c")  # fmt: skip
    net.send("A", slot_in(2, "idle"), "payout", task_id=TASK, round=0)
    proofs = distribution_proofs(listing)
    net.send("A", slot_in(3, "submission"), "claim", task_id=TASK, round=0, amount=80,
             proof=proofs["A"])  # fmt: skip
    assert net.refused("B", slot_in(3, "submission"), "claim", task_id=TASK, round=0, amount=80,
                       proof=proofs["B"]) == "over_bounty"  # fmt: skip
    assert net.state.tasks[TASK].rounds[0].claimable == 20


def three_with_c_voted_down() -> Net:
    """Task t2 (half of a rejected stake is cut, one auditor each): A, B and C submit for
    round 0 with 100 staked, and C's auditor votes it invalid."""
    net = new_net()
    net.send(OWNER, 3, "create_task", **task_fields(task_id="t2", slash_ppm=500_000,
                                                     max_auditors=1))  # fmt: skip
    for node in ["A", "B", "C"]:
        net.send(node, 4, "stake", task_id="t2", amount=100)
        net.send(node, slot_in(1, "submission"), "submit", task_id="t2", round=0, submission=node)
    view = round_view(net.state, "t2", 0)
    assert view["k"] == 1
    (auditor,) = view["auditors"]["C"]
    net.send(auditor, slot_in(1, "audit"), "audit", task_id="t2", round=0, invalid=["C"])
    return net


def test_slashing_takes_the_stake_at_settlement_time() -> None:
    net = three_with_c_voted_down()
    # C raises its stake while the audits are still open: nothing is settled yet
    result = net.send("C", slot_in(1, "audit", 1), "stake", task_id="t2", amount=100)
    assert "settled" not in result and result["stake"] == 200
    result = net.send("C", slot_in(4, "submission"), "unstake", task_id="t2", amount=100)
    assert result["slashed"] == 100  # half of the 200 staked at that moment
    assert net.state.tasks["t2"].stakes.get("C", 0) == 0


def test_a_stake_after_the_audits_settles_the_pending_round_first() -> None:
    net = three_with_c_voted_down()
    result = net.send("C", slot_in(1, "idle"), "stake", task_id="t2", amount=100)
    assert result["settled"] == 0 and result["slashed"] == 50 and result["stake"] == 150
    assert net.state.slashed_pool == 50 and "C" not in net.state.tasks["t2"].pending


# --- every refusal reason, and the state untouched by it ---


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Net]:
    """The happy path, frozen at the moments the refusal cases start from."""
    saved: dict[str, Net] = {}
    net = new_net()
    saved["staked"] = net.copy()
    for node in NODES:
        net.send(node, slot_in(1, "submission"), "submit", task_id=TASK, round=0,
                 submission=BAD if node == "E" else node)  # fmt: skip
    saved["submitted"] = net.copy()
    for node in ["A", "B", "C"]:
        net.send(node, slot_in(1, "audit"), "audit", task_id=TASK, round=0, invalid=["E"])
    saved["audited"] = net.copy()
    seed = round_view(net.state, TASK, 0)["seed"]
    distributor = distributor_of(seed, NODES, 0)
    assert distributor != "E" and distributor_of(seed, NODES, 1) == "E"  # see BAD
    listing = {n: 25 for n in ["A", "B", "C", "D"]}
    net.send(distributor, slot_in(2, "submission"), "submit_distribution", task_id=TASK,
             round=0, root=distribution_root(listing), total=100, cid="c")  # fmt: skip
    saved["distributed"] = net.copy()
    net.send(OWNER, slot_in(2, "idle"), "payout", task_id=TASK, round=0)
    saved["paid"] = net.copy()
    proofs = distribution_proofs(listing)
    net.send("A", slot_in(3, "submission"), "claim", task_id=TASK, round=0, amount=25,
             proof=proofs["A"])  # fmt: skip
    saved["claimed"] = net.copy()
    return saved


def _bad_submission() -> str:
    """A text for E's bad submission that makes E the distributor of attempt 1 (not 0) in the
    refusal cases' round (the order is a function of the submissions)."""
    for salt in range(200):
        text = f"bad-{salt}"
        texts = [text if node == "E" else node for node in NODES]
        order = distribution_order(audit_seed(TASK, 0, texts), NODES)
        if order[0] != "E" and order[1] == "E":
            return text
    raise AssertionError("no salt found")


BAD = _bad_submission()


def _distributor(net: Net) -> str:
    return net.state.tasks[TASK].rounds[0].attempts[0].distributor


def _proof_a() -> list[bytes]:
    return distribution_proofs({n: 25 for n in ["A", "B", "C", "D"]})["A"]


Case = tuple[str, str, int, str, dict[str, Any]]  # checkpoint, sender, slot, op, fields
A_SUB = slot_in(1, "submission")
A_AUD = slot_in(1, "audit")
D_SUB = slot_in(2, "submission")
D_AUD = slot_in(2, "audit")
LATER = slot_in(3, "submission")
GOOD_ROOT = bytes(32)
CASES: list[tuple[str, Callable[[dict[str, Net]], Case]]] = [
    ("bad_nonce", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 1, "nonce": 7})),
    ("insufficient_balance", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 901})),
    ("insufficient_balance", lambda c: ("staked", "A", 5, "stake",
                                        {"task_id": TASK, "amount": 901})),
    ("insufficient_balance", lambda c: ("staked", "A", 5, "unstake",
                                        {"task_id": TASK, "amount": 101})),
    ("unknown_task", lambda c: ("staked", "A", 5, "fund", {"task_id": "nope", "amount": 1})),
    ("task_exists", lambda c: ("staked", "A", 5, "create_task", task_fields())),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task",
                              task_fields(task_id="x", audit_window=7))),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task",
                              task_fields(task_id="x", slash_ppm=1_000_001))),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task",
                              task_fields(task_id="x", min_stake=0))),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task",
                              task_fields(task_id="x", round_time=True))),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task", task_fields(task_id=""))),
    ("bad_config", lambda c: ("staked", "A", 5, "create_task",
                              task_fields(task_id="x", code_hash=b"short"))),
    ("not_staked", lambda c: ("staked", RICH, A_SUB, "submit",
                              {"task_id": TASK, "round": 0, "submission": "x"})),
    ("outside_window", lambda c: ("staked", "A", A_AUD, "submit",
                                  {"task_id": TASK, "round": 0, "submission": "x"})),
    ("outside_window", lambda c: ("staked", "A", A_SUB, "submit",
                                  {"task_id": TASK, "round": 1, "submission": "x"})),
    ("outside_window", lambda c: ("submitted", "A", A_SUB, "audit",
                                  {"task_id": TASK, "round": 0, "invalid": []})),
    ("outside_window", lambda c: ("audited", _distributor(c["distributed"]), D_AUD,
                                  "submit_distribution", {"task_id": TASK, "round": 0,
                                  "root": GOOD_ROOT, "total": 1, "cid": "c"})),
    ("outside_window", lambda c: ("distributed", "A", D_SUB, "audit_distribution",
                                  {"task_id": TASK, "round": 0})),
    ("already_submitted", lambda c: ("submitted", "A", A_SUB + 1, "submit",
                                     {"task_id": TASK, "round": 0, "submission": "y"})),
    ("too_large", lambda c: ("staked", "A", A_SUB, "submit",
                             {"task_id": TASK, "round": 0, "submission": "é" * 257})),
    ("too_large", lambda c: ("audited", _distributor(c["distributed"]), D_SUB,
                             "submit_distribution", {"task_id": TASK, "round": 0,
                             "root": GOOD_ROOT, "total": 1, "cid": "c" * 257})),
    ("not_auditor", lambda c: ("submitted", RICH, A_AUD, "audit",
                               {"task_id": TASK, "round": 0, "invalid": []})),
    ("not_auditor", lambda c: ("submitted", "A", A_AUD, "audit",
                               {"task_id": TASK, "round": 0, "invalid": ["A"]})),
    ("not_auditor", lambda c: ("submitted", "A", A_AUD, "audit",
                               {"task_id": TASK, "round": 0, "invalid": ["ghost"]})),
    ("not_auditor", lambda c: ("distributed", RICH, D_AUD, "audit_distribution",
                               {"task_id": TASK, "round": 0})),
    ("already_voted", lambda c: ("audited", "A", A_AUD + 1, "audit",
                                 {"task_id": TASK, "round": 0, "invalid": []})),
    ("not_distributor", lambda c: ("audited", "E", D_SUB, "submit_distribution",
                                   {"task_id": TASK, "round": 0, "root": GOOD_ROOT, "total": 1,
                                    "cid": "c"})),
    ("not_distributor", lambda c: ("staked", "A", D_SUB, "submit_distribution",
                                   {"task_id": TASK, "round": 0, "root": GOOD_ROOT, "total": 1,
                                    "cid": "c"})),
    ("distribution_exists", lambda c: ("distributed", _distributor(c["distributed"]), D_SUB + 1,
                                       "submit_distribution", {"task_id": TASK, "round": 0,
                                       "root": GOOD_ROOT, "total": 1, "cid": "c"})),
    ("distribution_exists", lambda c: ("distributed", c["distributed"].state.tasks[TASK]
                                       .rounds[0].attempts[0].distributor, LATER,
                                       "submit_distribution", {"task_id": TASK, "round": 0,
                                       "root": GOOD_ROOT, "total": 1, "cid": "c"})),
    ("no_distribution", lambda c: ("audited", OWNER, LATER, "payout",
                                   {"task_id": TASK, "round": 0})),
    ("no_distribution", lambda c: ("audited", "A", D_AUD, "audit_distribution",
                                   {"task_id": TASK, "round": 0})),
    ("over_bounty", lambda c: ("audited", _distributor(c["distributed"]), D_SUB,
                               "submit_distribution", {"task_id": TASK, "round": 0,
                               "root": GOOD_ROOT, "total": 101, "cid": "c"})),
    ("not_ready", lambda c: ("distributed", OWNER, D_AUD, "payout",
                             {"task_id": TASK, "round": 0})),
    ("not_ready", lambda c: ("distributed", "A", LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 25, "proof": _proof_a()})),
    ("already_paid", lambda c: ("paid", OWNER, LATER, "payout", {"task_id": TASK, "round": 0})),
    ("bad_proof", lambda c: ("paid", "A", LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 24, "proof": _proof_a()})),
    ("bad_proof", lambda c: ("paid", "B", LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 25, "proof": _proof_a()})),
    ("bad_proof", lambda c: ("paid", RICH, LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 25, "proof": []})),
    ("already_claimed", lambda c: ("claimed", "A", LATER, "claim",
                                   {"task_id": TASK, "round": 0, "amount": 25,
                                    "proof": _proof_a()})),
    ("slashed", lambda c: ("paid", "E", LATER, "claim",
                           {"task_id": TASK, "round": 0, "amount": 25, "proof": _proof_a()})),
    ("slashed", lambda c: ("distributed", "E", D_AUD, "audit_distribution",
                           {"task_id": TASK, "round": 0})),
    ("slashed", lambda c: ("audited", "E", LATER, "submit_distribution",
                           {"task_id": TASK, "round": 0, "root": GOOD_ROOT, "total": 1,
                            "cid": "c"})),
    ("stake_locked", lambda c: ("submitted", "A", D_SUB, "unstake",
                                {"task_id": TASK, "amount": 1})),
    ("bad_amount", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 0})),
    ("bad_amount", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": -5})),
    ("bad_amount", lambda c: ("staked", "A", 5, "fund", {"task_id": TASK, "amount": 2**64})),
    ("bad_amount", lambda c: ("paid", "A", LATER, "claim",
                              {"task_id": TASK, "round": 0, "amount": 0, "proof": _proof_a()})),
    ("malformed", lambda c: ("staked", "A", 5, "mint", {"amount": 1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": True})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 1.0})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B"})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 1, "x": 1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "", "amount": 1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B" * 129, "amount": 1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "\ud800", "amount": 1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 1,
                                                            "nonce": -1})),
    ("malformed", lambda c: ("staked", "A", 5, "transfer", {"to": "B", "amount": 1,
                                                            "nonce": None})),
    ("malformed", lambda c: ("staked", "A", A_SUB, "submit",
                             {"task_id": TASK, "round": -1, "submission": "x"})),
    ("malformed", lambda c: ("staked", "A", A_SUB, "submit",
                             {"task_id": TASK, "round": 0, "submission": b"x"})),
    ("malformed", lambda c: ("submitted", "A", A_AUD, "audit",
                             {"task_id": TASK, "round": 0, "invalid": ["B", "B"]})),
    ("malformed", lambda c: ("submitted", "A", A_AUD, "audit",
                             {"task_id": TASK, "round": 0, "invalid": "B"})),
    ("malformed", lambda c: ("submitted", "A", A_AUD, "audit",
                             {"task_id": TASK, "round": 0, "invalid": ["B"] * 6})),
    ("malformed", lambda c: ("audited", _distributor(c["distributed"]), D_SUB,
                             "submit_distribution", {"task_id": TASK, "round": 0,
                             "root": bytes(31), "total": 1, "cid": "c"})),
    ("malformed", lambda c: ("paid", "A", LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 25,
                              "proof": [bytes(32)] * 65})),
    ("malformed", lambda c: ("paid", "A", LATER, "claim",
                             {"task_id": TASK, "round": 0, "amount": 25, "proof": ["ab"]})),
    ("malformed", lambda c: ("staked", "A", 5, "fund", {"task_id": 1, "amount": 1})),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "make"), CASES, ids=[f"{r}-{i}" for i, (r, _) in
                                                         enumerate(CASES)])  # fmt: skip
def test_refusal(
    checkpoints: dict[str, Net], reason: str, make: Callable[[dict[str, Net]], Case]
) -> None:
    checkpoint, sender, slot, op, fields = make(checkpoints)
    net = checkpoints[checkpoint].copy()
    tx = {"op": op, "nonce": net.state.nonces.get(sender, 0), **fields}
    before = net.state.to_bytes()
    nonce_before = net.state.nonces.get(sender, 0)
    with pytest.raises(Refused) as caught:
        apply(net.state, sender, tx, slot)
    assert caught.value.reason == reason, caught.value
    assert caught.value.detail
    assert net.state.to_bytes() == before
    assert net.state.nonces.get(sender, 0) == nonce_before


def test_every_reason_has_a_case() -> None:
    assert {reason for reason, _ in CASES} == REASONS


def test_not_a_dict_and_a_bad_sender_are_malformed() -> None:
    state = genesis({"A": 1})
    for sender, tx in [("A", ["transfer"]), ("", {"op": "transfer", "to": "B", "amount": 1,
                                                  "nonce": 0}), ("A", {"nonce": 0})]:  # fmt: skip
        with pytest.raises(Refused) as caught:
            apply(state, sender, tx, 0)  # type: ignore[arg-type]
        assert caught.value.reason == "malformed"
    with pytest.raises(ValueError):
        apply(state, "A", {"op": "transfer", "to": "B", "amount": 1, "nonce": 0}, -1)


def test_config_defaults_and_genesis_checks() -> None:
    cfg = TaskConfig(**task_fields())
    assert (cfg.allowed_failed_distributions, cfg.slash_ppm, cfg.unstake_delay_rounds,
            cfg.max_auditors) == (3, 700_000, 2, 5)  # fmt: skip
    with pytest.raises(Refused) as caught:
        TaskConfig(**task_fields(max_auditors=0))
    assert caught.value.reason == "bad_config"
    with pytest.raises(ValueError):
        genesis({"A": -1})
    with pytest.raises(ValueError):
        genesis({"A": 2**63, "B": 2**63})
    assert genesis({"A": 0, "B": 3}).balances == {"B": 3}
    with pytest.raises(ValueError):
        Refused("no_such_reason")


def test_create_task_without_start_slot_starts_at_its_slot() -> None:
    net = Net(genesis({"A": 10}))
    fields = task_fields()
    del fields["start_slot"]
    result = net.send("A", 42, "create_task", **fields)
    assert result["start_slot"] == 42 and net.state.tasks[TASK].config.start_slot == 42


def test_snapshots_are_canonical() -> None:
    net = new_net()
    for node in NODES:
        net.send(node, A_SUB, "submit", task_id=TASK, round=0, submission=node)
    net.send("B", A_AUD, "audit", task_id=TASK, round=0, invalid=["A", "C"])
    data = net.state.to_bytes()
    again = ChainState.from_bytes(data)
    assert again == net.state and again.to_bytes() == data
    with pytest.raises(ValueError):
        ChainState.from_bytes(b"\x93\x01\x02")
    with pytest.raises(ValueError):
        ChainState.from_bytes(b"garbage")


# --- a random walk of transactions ---

WALK_NODES = ["A", "B", "C", "D"]
WALK_ROUND, WALK_SUB, WALK_AUD = 6, 2, 2
WALK_TASKS = ["w1", "w2"]
LISTS = ["fair", "greedy", "everyone"]


class SettlementWalk(RuleBasedStateMachine):
    """Random senders, operations and time; most transactions are plausible (the right round,
    the current nonce, lists built from the real submitters) so that the walk reaches audits,
    slashing, distributions, payouts and claims, and some are junk."""

    def __init__(self) -> None:
        super().__init__()
        self.state = genesis({**{n: 2_000 for n in WALK_NODES}, OWNER: 50_000})
        self.supply = self.state.total_supply()
        self.slot = 0
        self.lists: dict[tuple[str, int, bytes], dict[str, int]] = {}
        self.claimed: dict[tuple[str, int], int] = {}
        self.refusals: dict[str, int] = {}
        self.applied: dict[str, int] = {}

    # the one place transactions are applied, with the checks every step must pass
    def send(self, sender: str, tx: dict[str, Any]) -> dict[str, Any] | None:
        before = self.state.to_bytes()
        nonce = self.state.nonces.get(sender, 0)
        try:
            result = apply(self.state, sender, tx, self.slot)
        except Refused as refusal:
            assert refusal.reason in REASONS
            assert self.state.to_bytes() == before
            self.refusals[refusal.reason] = self.refusals.get(refusal.reason, 0) + 1
            return None
        assert result["ok"] and self.state.nonces[sender] == nonce + 1
        self.applied[tx["op"]] = self.applied.get(tx["op"], 0) + 1
        return result

    def tx(self, sender: str, op: str, nonce_ok: bool = True, **fields: Any) -> dict[str, Any]:
        nonce = self.state.nonces.get(sender, 0)
        return {"op": op, "nonce": nonce if nonce_ok else nonce + 1, **fields}

    def current_round(self, task_id: str) -> int:
        task = self.state.tasks.get(task_id)
        if task is None:
            return 0
        return max(0, (self.slot - task.config.start_slot) // task.config.round_time)

    @initialize()
    def create_tasks(self) -> None:
        for i, task_id in enumerate(WALK_TASKS):
            fields = task_fields(task_id=task_id, round_time=WALK_ROUND,
                                 submission_window=WALK_SUB, audit_window=WALK_AUD,
                                 start_slot=0, bounty_per_round=150, min_stake=100,
                                 max_auditors=2 + i, allowed_failed_distributions=1 + i,
                                 unstake_delay_rounds=i)  # fmt: skip
            assert self.send(OWNER, self.tx(OWNER, "create_task", **fields))
            assert self.send(OWNER, self.tx(OWNER, "fund", task_id=task_id, amount=400))
            for node in WALK_NODES:
                assert self.send(node, self.tx(node, "stake", task_id=task_id, amount=150))
        self.slot = WALK_ROUND  # round 1: the work of round 0 is due

    @rule(steps=st.integers(1, 4))
    def time_passes(self, steps: int) -> None:
        self.slot += steps

    @rule(window=st.sampled_from(["submission", "audit", "idle"]), offset=st.integers(0, 1))
    def next_window(self, window: str, offset: int) -> None:
        """Jump to the start (or one slot in) of the next window of that kind."""
        start = {"submission": 0, "audit": WALK_SUB, "idle": WALK_SUB + WALK_AUD}[window]
        base = self.slot - self.slot % WALK_ROUND + start + offset
        self.slot = base if base > self.slot else base + WALK_ROUND

    @rule(sender=st.sampled_from(WALK_NODES), task_id=st.sampled_from(WALK_TASKS),
          amount=st.integers(-5, 400), nonce_ok=st.booleans())  # fmt: skip
    def stake(self, sender: str, task_id: str, amount: int, nonce_ok: bool) -> None:
        self.send(sender, self.tx(sender, "stake", nonce_ok, task_id=task_id, amount=amount))

    @rule(task_id=st.sampled_from(WALK_TASKS), amount=st.integers(50, 150))
    def everyone_stakes(self, task_id: str, amount: int) -> None:
        for sender in WALK_NODES:
            self.send(sender, self.tx(sender, "stake", task_id=task_id, amount=amount))

    @rule(sender=st.sampled_from(WALK_NODES), task_id=st.sampled_from(WALK_TASKS),
          amount=st.integers(1, 400))  # fmt: skip
    def unstake(self, sender: str, task_id: str, amount: int) -> None:
        self.send(sender, self.tx(sender, "unstake", task_id=task_id, amount=amount))

    @rule(sender=st.sampled_from([*WALK_NODES, OWNER]), task_id=st.sampled_from(WALK_TASKS),
          amount=st.integers(1, 300))  # fmt: skip
    def fund(self, sender: str, task_id: str, amount: int) -> None:
        self.send(sender, self.tx(sender, "fund", task_id=task_id, amount=amount))

    @rule(sender=st.sampled_from(WALK_NODES), to=st.sampled_from([*WALK_NODES, OWNER, "new"]),
          amount=st.integers(-1, 300))  # fmt: skip
    def transfer(self, sender: str, to: str, amount: int) -> None:
        self.send(sender, self.tx(sender, "transfer", to=to, amount=amount))

    @rule(task_id=st.sampled_from(WALK_TASKS), honest=st.lists(st.booleans(), min_size=4,
          max_size=4), late=st.sampled_from([0, 0, 0, -1, 1]))  # fmt: skip
    def everyone_submits(self, task_id: str, honest: list[bool], late: int) -> None:
        r = self.current_round(task_id) - 1 + late
        for sender, ok in zip(WALK_NODES, honest, strict=True):
            submission = "good" if ok else "bad"
            self.send(sender, self.tx(sender, "submit", task_id=task_id, round=max(r, 0),
                                      submission=submission))  # fmt: skip

    @rule(task_id=st.sampled_from(WALK_TASKS), kinds=st.lists(st.integers(0, 4), min_size=4,
          max_size=4))  # fmt: skip
    def auditors_vote(self, task_id: str, kinds: list[int]) -> None:
        """Each auditor in turn: 0, 1 truthful; 2 everyone it audits; 3 nobody; 4 "A"."""
        r = max(0, self.current_round(task_id) - 1)
        view = round_view(self.state, task_id, r)
        for auditor, kind in zip(WALK_NODES, kinds, strict=True):
            targets = [t for t, auditors in view["auditors"].items() if auditor in auditors]
            truthful = [t for t in targets if view["submissions"][t] == "bad"]
            invalid = [truthful, truthful, targets, [], ["A"]][kind]
            self.send(auditor, self.tx(auditor, "audit", task_id=task_id, round=r,
                                       invalid=invalid))  # fmt: skip

    @rule(task_id=st.sampled_from(WALK_TASKS), back=st.integers(2, 4), kind=st.sampled_from(LISTS),
          total=st.sampled_from([None, 0, 151]))  # fmt: skip
    def distributor_sends(self, task_id: str, back: int, kind: str, total: int | None) -> None:
        """kind: "fair" (accepted submitters, equal shares), "greedy" (the distributor takes
        it all) or "everyone" (rejected submitters listed too: they still may not claim)."""
        r = self.current_round(task_id) - back
        if r < 0:
            return
        view = round_view(self.state, task_id, r, self.slot)
        sender = view["current_distributor"] or "A"
        accepted = view["accepted"] or WALK_NODES
        listed = sorted(view["submissions"]) if kind == "everyone" else accepted
        listing = {a: 150 // len(listed) for a in listed} if kind != "greedy" else {sender: 150}
        root = distribution_root(listing)
        self.lists[(task_id, r, root)] = listing
        amount = sum(listing.values()) if total is None else total
        self.send(sender, self.tx(sender, "submit_distribution", task_id=task_id, round=r,
                                  root=root, total=amount, cid="cid"))  # fmt: skip

    @rule(task_id=st.sampled_from(WALK_TASKS), back=st.integers(2, 4),
          voters=st.lists(st.sampled_from(WALK_NODES), max_size=4))  # fmt: skip
    def distribution_voted_down(self, task_id: str, back: int, voters: list[str]) -> None:
        r = self.current_round(task_id) - back
        if r >= 0:
            for voter in voters:
                self.send(voter, self.tx(voter, "audit_distribution", task_id=task_id, round=r))

    @rule(task_id=st.sampled_from(WALK_TASKS),
          honest=st.lists(st.booleans(), min_size=4, max_size=4),
          kinds=st.lists(st.integers(0, 4), min_size=4, max_size=4),
          kind=st.sampled_from(LISTS),
          voters=st.lists(st.sampled_from(WALK_NODES), max_size=3))  # fmt: skip
    def a_round_goes_by(
        self, task_id: str, honest: list[bool], kinds: list[int], kind: str, voters: list[str]
    ) -> None:
        """The usual traffic of one round, Hypothesis choosing who cheats and how."""
        if self.state.tasks[task_id].pool < 300:
            self.fund(OWNER, task_id, 300)
        self.next_window("submission", 0)
        self.everyone_submits(task_id, honest, 0)
        self.distributor_sends(task_id, 2, kind, None)
        self.everyone_claims(task_id, 3, 0)
        self.next_window("audit", 0)
        self.auditors_vote(task_id, kinds)
        self.distribution_voted_down(task_id, 2, voters)
        self.next_window("idle", 0)
        self.payout(task_id, 2)

    @rule(task_id=st.sampled_from(WALK_TASKS), back=st.integers(2, 6))
    def payout(self, task_id: str, back: int) -> None:
        r = self.current_round(task_id) - back
        if r >= 0 and self.send(OWNER, self.tx(OWNER, "payout", task_id=task_id, round=r)):
            rs = self.state.tasks[task_id].rounds[r]
            assert rs.claimable <= self.state.tasks[task_id].config.bounty_per_round

    @rule(task_id=st.sampled_from(WALK_TASKS), back=st.integers(2, 7),
          extra=st.integers(0, 1))  # fmt: skip
    def everyone_claims(self, task_id: str, back: int, extra: int) -> None:
        for sender in WALK_NODES:
            self.claim(task_id, back, sender, extra)

    @rule(task_id=st.sampled_from(WALK_TASKS), back=st.integers(2, 7),
          sender=st.sampled_from(WALK_NODES), extra=st.integers(0, 1))  # fmt: skip
    def claim(self, task_id: str, back: int, sender: str, extra: int) -> None:
        r = self.current_round(task_id) - back
        rs = self.state.tasks[task_id].rounds.get(r)
        if rs is None or rs.accepted_attempt is None:
            return
        listing = self.lists.get((task_id, r, rs.attempts[rs.accepted_attempt].root), {})
        amount = listing.get(sender, 1) + extra
        proof = distribution_proofs(listing).get(sender, []) if listing else []
        rejected = sender in rejected_of(self.state.tasks[task_id], r, rs)
        if self.send(sender, self.tx(sender, "claim", task_id=task_id, round=r, amount=amount,
                                     proof=proof)):  # fmt: skip
            assert not rejected and sender in rs.submissions
            key = (task_id, r)
            self.claimed[key] = self.claimed.get(key, 0) + amount

    @rule(sender=st.sampled_from([*WALK_NODES, "stranger"]),
          tx=st.dictionaries(st.sampled_from(["op", "nonce", "task_id", "round", "amount",
                                              "to", "invalid", "proof", "root", "total", "cid",
                                              "submission"]),
                             st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                                       st.sampled_from(["transfer", "stake", "claim", "w1",
                                                        "A", "submit", "payout"]),
                                       st.binary(max_size=33), st.text(max_size=4),
                                       st.lists(st.text(max_size=2), max_size=3))))  # fmt: skip
    def junk(self, sender: str, tx: dict[str, Any]) -> None:
        self.send(sender, tx)

    @invariant()
    def funds_are_conserved(self) -> None:
        assert self.state.total_supply() == self.supply
        assert self.state.slashed_pool >= 0
        assert all(v > 0 for v in self.state.balances.values())
        for task_id, task in self.state.tasks.items():
            assert task.pool >= 0 and all(v > 0 for v in task.stakes.values())
            bounty = task.config.bounty_per_round
            for r, rs in task.rounds.items():
                assert 0 <= rs.claimable <= bounty
                if rs.paid:
                    assert rs.accepted_attempt is not None
                    total = rs.attempts[rs.accepted_attempt].total
                    assert total <= bounty
                    assert self.claimed.get((task_id, r), 0) + rs.claimable == total
                else:
                    assert rs.claimable == 0 and not rs.claimed
                assert not (rs.claimed & rejected_of(task, r, rs))
                assert rs.claimed <= set(rs.submissions)

    @invariant()
    def snapshots_round_trip(self) -> None:
        data = self.state.to_bytes()
        again = ChainState.from_bytes(data)
        assert again == self.state and again.to_bytes() == data


SettlementWalk.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSettlementWalk = SettlementWalk.TestCase


def test_the_walk_reaches_the_interesting_places() -> None:
    """A deterministic long walk: the random one above must not be vacuous."""
    walk = SettlementWalk()
    walk.create_tasks()
    rng = random.Random(5)
    for _ in range(240):
        walk.time_passes(1)
        for task_id in WALK_TASKS:
            if walk.state.tasks[task_id].pool < 300:
                walk.fund(OWNER, task_id, 300)
            for node in WALK_NODES:
                if walk.state.tasks[task_id].stakes.get(node, 0) < 100:
                    walk.stake(node, task_id, 100, True)
            walk.everyone_submits(task_id, [rng.random() > 0.1 for _ in WALK_NODES], 0)
            walk.auditors_vote(task_id, [rng.choice([0, 0, 0, 2, 3, 4]) for _ in WALK_NODES])
            walk.distributor_sends(task_id, rng.randint(2, 3), rng.choice(LISTS), None)
            walk.distribution_voted_down(task_id, 2, rng.sample(WALK_NODES, rng.randint(0, 3)))
            walk.payout(task_id, rng.randint(2, 4))
            for node in WALK_NODES:
                walk.claim(task_id, rng.randint(3, 6), node, 0)
            if rng.random() < 0.05:
                walk.unstake(rng.choice(WALK_NODES), task_id, 10)
        walk.funds_are_conserved()
    walk.snapshots_round_trip()
    assert walk.applied.get("claim", 0) > 10, walk.applied
    assert walk.applied.get("payout", 0) > 5 and walk.applied.get("unstake", 0) > 0
    assert walk.state.slashed_pool > 0
    assert walk.refusals.get("slashed", 0) > 0 or walk.refusals.get("bad_proof", 0) > 0
