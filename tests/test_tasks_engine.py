# Tests of the round engine (tasks/engine.py): table tests of single decisions against
# chain.rules' round views, and whole networks of 5-50 nodes run sans-IO by tasks/simulate.py
# (Hypothesis picks sizes, misbehaving nodes, downtime and restarts).
from __future__ import annotations

import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.assignment import audit_seed, distribution_order
from chain.rules import TaskConfig, apply, genesis, round_view, task_view
from tasks.engine import (
    Audit,
    Claim,
    Event,
    EventKind,
    Misbehaviour,
    Payout,
    Record,
    RunWork,
    Submit,
    SubmitDistribution,
    VoteDistribution,
    audit_targets,
    config_of,
    next_boundary,
    plan,
    stake_of,
    views_needed,
)
from tasks.simulate import node_name, proof_of, simulate

CFG = TaskConfig(task_id="t", name="hello", code_hash=bytes(32), round_time=10,
                 submission_window=3, audit_window=3, min_stake=100, bounty_per_round=1000,
                 start_slot=5)


def slot_of(r: int, offset: int) -> int:
    return CFG.start_slot + r * CFG.round_time + offset


# --- the clock ----------------------------------------------------------------------------


def test_next_boundary_is_the_next_window_edge() -> None:
    assert next_boundary(CFG, 0) == 5
    assert next_boundary(CFG, slot_of(0, 0)) == slot_of(0, 3)
    assert next_boundary(CFG, slot_of(0, 2)) == slot_of(0, 3)
    assert next_boundary(CFG, slot_of(0, 3)) == slot_of(0, 6)
    assert next_boundary(CFG, slot_of(0, 6)) == slot_of(1, 0)
    assert next_boundary(CFG, slot_of(4, 9)) == slot_of(5, 0)
    tight = TaskConfig(**{**CFG.to_dict(), "audit_window": 7})
    assert next_boundary(tight, slot_of(2, 3)) == slot_of(3, 0)


def test_before_start_nothing() -> None:
    p = plan(CFG, 2, "a", Record(), {})
    assert p.actions == () and p.events == () and p.wake_slot == 5


# --- work and submission --------------------------------------------------------------------


def test_work_then_submit_only_in_the_next_submission_window() -> None:
    rec = Record()
    p = plan(CFG, slot_of(0, 5), "a", rec, {})
    assert p.actions == (RunWork(0),)
    assert plan(CFG, slot_of(0, 5), "a", rec, {}) == p  # asking twice: same answer
    rec.done(RunWork(0))
    assert plan(CFG, slot_of(0, 8), "a", rec, {}).actions == ()
    p = plan(CFG, slot_of(1, 0), "a", rec, {}, stake=100)
    assert p.actions == (RunWork(1), Submit(0))
    for a in p.actions:
        rec.done(a)
    assert plan(CFG, slot_of(1, 1), "a", rec, {}).actions == ()  # not repeated


def test_no_submit_outside_its_window() -> None:
    rec = Record(worked={0})
    for offset in (3, 5, 6, 9):
        assert not any(isinstance(a, Submit)
                       for a in plan(CFG, slot_of(1, offset), "a", rec, {}).actions)
    for r in (2, 3, 7):  # restarted later: the window of round 0's submission has passed
        actions = plan(CFG, slot_of(r, 0), "a", rec, {}).actions
        assert actions == (RunWork(r),)


def test_unstaked_node_reports_once() -> None:
    rec = Record(worked={0})
    p = plan(CFG, slot_of(1, 0), "a", rec, {}, stake=99)
    assert not any(isinstance(a, Submit) for a in p.actions)
    assert p.events == (Event(EventKind.NOT_STAKED, 0, "stake 99 < min_stake 100"),)
    rec.note(p.events[0])
    assert plan(CFG, slot_of(1, 1), "a", rec, {}, stake=99).events == ()


def test_misbehaviour_flags() -> None:
    rec = Record(worked={0})
    at = slot_of(1, 0)
    assert Submit(0, garbage=True) in plan(
        CFG, at, "a", rec, {}, misbehaviour=Misbehaviour.WRONG_SUBMISSION).actions
    assert plan(CFG, at, "a", rec, {}, misbehaviour=Misbehaviour.NO_SUBMISSION).actions == ()
    assert {m.value for m in Misbehaviour} == {
        "wrong-submission", "no-submission", "false-audit", "bad-distribution"}


def test_record_round_trip_and_prune() -> None:
    rec = Record()
    for a in (RunWork(1), Submit(1), Audit(1, ("x",)), SubmitDistribution(1, 0),
              VoteDistribution(1, 1), Payout(1), Claim(1), RunWork(9)):
        rec.done(a)
    rec.note(Event(EventKind.REJECTED, 3))
    again = Record.from_dict(rec.to_dict())
    assert again == rec
    assert 1 in again.closed and 3 in again.closed
    again.prune(5)
    assert again == Record(worked={9})


# --- against the rules: one round of 4 nodes, step by step ------------------------------------


class Net:
    def __init__(self, accounts: list[str]) -> None:
        self.accounts = accounts
        self.state = genesis({"owner": 10**6, **{a: 1000 for a in accounts}})
        self.send("owner", {"op": "create_task", **{
            k: v for k, v in CFG.to_dict().items()}}, 0)
        self.send("owner", {"op": "fund", "task_id": "t", "amount": 10_000}, 0)
        for a in accounts:
            self.send(a, {"op": "stake", "task_id": "t", "amount": 100}, 0)
        self.cfg = config_of(task_view(self.state, "t"))
        self.records = {a: Record() for a in accounts}

    def send(self, sender: str, tx: dict[str, Any], slot: int) -> dict[str, Any]:
        tx["nonce"] = self.state.nonces.get(sender, 0)
        return apply(self.state, sender, tx, slot)

    def plan(self, a: str, slot: int, **kw: Any) -> Any:
        rec = self.records[a]
        views = {r: round_view(self.state, "t", r, slot) for r in views_needed(self.cfg, slot, rec)}
        tv = task_view(self.state, "t")
        return plan(self.cfg, slot, a, rec, views, stake=stake_of(tv, a), **kw)


def garbage_not_first(accounts: list[str]) -> str:
    """A garbage submission for the last account that leaves the first distribution turn to
    an honest one (the order is a function of the submissions)."""
    for salt in range(100):
        text = f"garbage-{salt}"
        texts = [proof_of(a, 0) for a in accounts[:-1]] + [text]
        if distribution_order(audit_seed("t", 0, texts), accounts)[0] != accounts[-1]:
            return text
    raise AssertionError("no salt found")


def test_one_round_step_by_step_against_the_rules() -> None:
    accounts = ["a", "b", "c", "d"]
    net = Net(accounts)
    for a in accounts:
        assert net.plan(a, slot_of(0, 0)).actions == (RunWork(0),)
        net.records[a].done(RunWork(0))
    for a in accounts:  # round 1, submission window
        p = net.plan(a, slot_of(1, 1))
        assert p.actions == (RunWork(1), Submit(0))
        sub = garbage_not_first(accounts) if a == "d" else proof_of(a, 0)
        net.send(a, {"op": "submit", "task_id": "t", "round": 0, "submission": sub}, slot_of(1, 1))
        for act in p.actions:
            net.records[a].done(act)
    audits: dict[str, tuple[str, ...]] = {}
    for a in accounts:  # round 1, audit window: each audits k = 3 others
        (act,) = net.plan(a, slot_of(1, 3)).actions
        assert isinstance(act, Audit) and len(act.targets) == 3 and a not in act.targets
        audits[a] = act.targets
        assert net.plan(a, slot_of(1, 4)).actions == (act,)  # until recorded
        net.records[a].done(act)
        assert net.plan(a, slot_of(1, 4)).actions == ()
        invalid = [t for t in act.targets if t == "d"]
        if invalid:
            net.send(a, {"op": "audit", "task_id": "t", "round": 0, "invalid": invalid},
                     slot_of(1, 4))
    assert sorted(t for ts in audits.values() for t in ts) == sorted(accounts * 3)
    # round 2, submission window: d is rejected, exactly one distributor among a, b, c
    at = slot_of(2, 0)
    plans = {a: net.plan(a, at) for a in accounts}
    assert plans["d"].events == (Event(EventKind.REJECTED, 0,
                                       "submission rejected by its auditors"),)
    distributors = [a for a in accounts if SubmitDistribution(0, 0) in plans[a].actions]
    assert len(distributors) == 1
    (dist,) = distributors
    from chain.merkle import distribution_root
    entries = {a: 333 for a in ["a", "b", "c"]}
    net.send(dist, {"op": "submit_distribution", "task_id": "t", "round": 0,
                    "root": distribution_root(entries), "total": 999, "cid": "x"}, at)
    net.records[dist].done(SubmitDistribution(0, 0))
    net.records["d"].note(plans["d"].events[0])
    at = slot_of(2, 4)
    for a in ["a", "b", "c"]:
        expect = () if a == dist else (VoteDistribution(0, 0),)
        assert tuple(x for x in net.plan(a, at).actions if not isinstance(x, RunWork)) == expect
    assert views_needed(net.cfg, at, net.records["d"]) == []  # d's round 0 is closed
    # after the audit window: the distributor pays out, then everyone listed claims
    at = slot_of(2, 6)
    for a in ["a", "b", "c"]:
        acts = [x for x in net.plan(a, at).actions if not isinstance(x, RunWork)]
        assert acts == ([Payout(0)] if a == dist else [])
    net.send(dist, {"op": "payout", "task_id": "t", "round": 0}, at)
    net.records[dist].done(Payout(0))
    for a in ["a", "b", "c"]:
        acts = [x for x in net.plan(a, at + 1).actions if not isinstance(x, RunWork)]
        assert acts == [Claim(0)]


# --- whole networks -------------------------------------------------------------------------


def check_invariants(result: dict[str, Any], honest: list[str]) -> None:
    assert result["supply_conserved"]
    assert result["repeated_actions"] == 0
    for a in honest:
        assert set(result["refused_by"].get(a, {})) <= {"already_paid"}, result["refused_detail"]
        assert result["claimed_rounds"][a] == result["submitted_rounds"][a], a


def test_honest_network_every_node_paid_every_round() -> None:
    result = simulate(12, 3)
    names = [node_name(i) for i in range(12)]
    check_invariants(result, names)
    assert result["refused"] == {}
    assert result["audit_coverage"] == 1.0
    assert result["paid_rounds"] == [0, 1, 2]
    assert all(result["submitted_rounds"][a] == [0, 1, 2] for a in names)
    assert result["txs_by_op"] == {"create_task": 1, "fund": 1, "stake": 12, "submit": 36,
                                   "submit_distribution": 3, "payout": 3, "claim": 36}
    assert set(result["payouts"].values()) == {3 * 1000}
    assert result["pool"] == 0


def test_each_misbehaviour() -> None:
    bad = {1: Misbehaviour.WRONG_SUBMISSION, 2: Misbehaviour.NO_SUBMISSION,
           3: Misbehaviour.FALSE_AUDIT}
    result = simulate(10, 2, bad)
    honest = [node_name(i) for i in range(10) if i not in bad]
    check_invariants(result, honest + [node_name(3)])  # one false auditor harms nobody
    assert result["stakes"][node_name(1)] < 1_000_000  # slashed
    # rejected every round it got to submit in (the lazy slash may land after its next submit)
    assert result["submitted_rounds"][node_name(1)]
    rounds = result["submitted_rounds"][node_name(1)]
    assert result["rejected"] == {r: [node_name(1)] for r in rounds}
    assert result["submitted_rounds"][node_name(2)] == []
    assert result["payouts"][node_name(1)] == 0 and result["payouts"][node_name(2)] == 0


def test_bad_distributors_pass_the_turn() -> None:
    # every node but 0..2 lists itself inflated: rounds whose first distributor is bad take
    # a later attempt, voted down by the honest majority of voters
    n = 7
    bad = {i: Misbehaviour.BAD_DISTRIBUTION for i in range(3, n)}
    result = simulate(n, 6, bad)
    check_invariants(result, [node_name(i) for i in range(n)])
    attempts = result["accepted_attempts"]
    assert all(a is not None for a in attempts.values())
    assert any(a > 0 for a in attempts.values())  # some round needed a second attempt
    # bad distributors still vote honestly on others' lists, so a bad list is always voted down
    assert set(result["payouts"].values()) == {6 * 1000}


def test_restart_and_downtime_resume_without_repeats() -> None:
    # node 0 restarts (record reloaded) in the middle of each window; node 1 is down for a
    # whole round (misses round 1's submission: not paid for it, nothing stale retried)
    result = simulate(8, 4, restart_at={0: 5, 1: 2}, down={1: (4, 7), 2: (9, 11)})
    check_invariants(result, [node_name(i) for i in range(8)])
    assert result["submitted_rounds"][node_name(0)] == [0, 1, 2, 3]
    assert 1 not in result["submitted_rounds"][node_name(1)]


def test_payout_falls_back_when_the_distributor_is_down() -> None:
    # round_time 3, start 1: round 0's payout is due at slot 9 (round 2's audit end); whoever
    # the distributor is, when it is down from 9 to 12 the next ones in order pay at slot 12
    for i in range(5):
        result = simulate(5, 1, down={i: (9, 13)})
        check_invariants(result, [node_name(j) for j in range(5)])
        assert result["paid_rounds"] == [0]
        assert 1 <= result["txs_by_op"]["payout"] <= 4


def test_thousand_nodes_one_round_is_fast() -> None:
    t0 = time.process_time()
    result = simulate(1000, 1)
    cpu = time.process_time() - t0
    assert result["claimed_rounds"][node_name(999)] == [0]
    assert result["txs_by_op"]["claim"] == 1000 and result["refused"] == {}
    assert cpu < 10.0, cpu


modes = st.sampled_from([Misbehaviour.WRONG_SUBMISSION, Misbehaviour.NO_SUBMISSION,
                         Misbehaviour.BAD_DISTRIBUTION])


@st.composite
def networks(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(5, 50))
    rounds = draw(st.integers(1, 4))
    round_time = draw(st.integers(2, 5))
    sw = draw(st.integers(1, round_time - 1))
    aw = draw(st.integers(1, round_time - sw))
    bad_idx = draw(st.lists(st.integers(0, n - 1), max_size=max(1, n // 5), unique=True))
    bad = {i: draw(modes) for i in bad_idx}
    dist_bad = [i for i, m in bad.items() if m is Misbehaviour.BAD_DISTRIBUTION]
    for i in dist_bad[3:]:  # at most allowed_failed_distributions bad distributors
        del bad[i]
    honest = [i for i in range(n) if i not in bad]
    end = 1 + (rounds + 3) * round_time
    down = {}
    for i in draw(st.lists(st.sampled_from(honest), max_size=3, unique=True)):
        first = draw(st.integers(1, end))
        down[i] = (first, first + draw(st.integers(1, 2 * round_time)))
    restarts = {i: draw(st.integers(1, end))
                for i in draw(st.lists(st.sampled_from(honest), max_size=3, unique=True))}
    return {"n": n, "rounds": rounds, "round_time": round_time, "sw": sw, "aw": aw,
            "bad": bad, "down": down, "restarts": restarts}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks(net: dict[str, Any]) -> None:
    result = simulate(net["n"], net["rounds"], net["bad"], down=net["down"],
                      restart_at=net["restarts"], round_time=net["round_time"],
                      submission_window=net["sw"], audit_window=net["aw"])
    honest = [node_name(i) for i in range(net["n"]) if i not in net["bad"]]
    check_invariants(result, honest)
    for i, mode in net["bad"].items():
        a = node_name(i)
        if mode is Misbehaviour.WRONG_SUBMISSION and result["submitted_rounds"][a]:
            assert result["stakes"][a] < 1_000_000 and result["payouts"][a] == 0
        if mode is Misbehaviour.NO_SUBMISSION:
            assert result["submitted_rounds"][a] == []
    up_all_along = not net["down"]
    if up_all_along:
        assert result["audit_coverage"] == 1.0
        for a in honest:
            assert result["submitted_rounds"][a] == list(range(net["rounds"]))


def test_rounds_of_equal_texts_by_other_nodes_do_not_share_a_ring() -> None:
    """The seed names the texts submitted, not who submitted them: a ring cached by seed
    alone handed one round's ring to another (KeyError, or wrong targets)."""
    from chain.assignment import targets_of

    first, second = Net(["a", "b", "c", "d"]), Net(["e", "f", "g", "h"])
    for net in (first, second):
        for account in net.accounts:
            net.send(account, {"op": "submit", "task_id": "t", "round": 0,
                               "submission": "same"}, slot_of(1, 1))
    for net in (first, second):
        view = round_view(net.state, "t", 0, slot_of(1, 3))
        for account in net.accounts:
            assert audit_targets(view, account, 5) == targets_of(
                bytes(view["seed"]), net.accounts, account, 5)
