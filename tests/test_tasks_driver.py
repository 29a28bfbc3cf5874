# The task driver (tasks/driver.py) on a real ledger file whose clock the test moves: what a
# failed step means. A transient failure (the chain or the store not answering, a refusal that
# time clears: a window not open yet, a payout or claim a moment early, a nonce race) leaves
# the action planned, so the next step tries it again; a permanent one (a refusal the rules
# will repeat, a bug in the driver's own code) is given up for the round, logged once and
# counted (steps_abandoned), and the node moves on instead of trying it again and again.
# Also: the claims and rewards a node counted survive its restart (its record keeps them).
# A task surviving a real store outage: test_task_store_outage.py.
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from chain_worlds import LedgerWorld, staked_task_world
from test_tasks_api import FakeContext, FakeNetwork

from chain.adapter import ChainUnavailable
from chain.ledger import LedgerBusy
from chain.merkle import EVM_LEAVES
from chain.rules import Refused
from kv.config import NotAdmitted, OutcomeUnknown, QuorumError
from tasks import driver as driver_module
from tasks.api import Task
from tasks.driver import TaskDriver, encode_list, transient
from tasks.engine import config_of, lookback

NODES = ["A", "B"]
TASK = "echo"
S0, ROUND, SUB, AUD = 20, 10, 4, 4


def slot_in(r: int, window: str, offset: int = 0) -> int:
    return S0 + r * ROUND + {"submission": 0, "audit": SUB, "idle": SUB + AUD}[window] + offset


class Echo(Task):
    name = "echo"

    async def task(self, round: int) -> None:
        return None

    async def submission(self, round: int) -> str:
        return f"proof-{round}"

    async def audit(self, submission: str, round: int, submitter: str) -> bool:
        return True


@pytest.fixture
def world(tmp_path: Path) -> Iterator[LedgerWorld]:
    with staked_task_world(tmp_path / "ledger.db", NODES, TASK, "echo", start=S0,
                           round_time=ROUND, submission_window=SUB,
                           audit_window=AUD) as w:
        yield w


async def driver_for(w: LedgerWorld, name: str, records: Path,
                     net: FakeNetwork | None = None) -> TaskDriver:
    """Node `name`'s driver of the task, its config read from the chain (as `run` does)."""
    adapter = w.adapter(name)
    ctx = FakeContext(net or FakeNetwork(), w.acct(name), TASK)
    d = TaskDriver(adapter, TASK, Echo(ctx), ctx, records, say=lambda _line: None)
    view = await adapter.task(TASK)
    assert view is not None
    d.cfg = config_of(view)
    return d


def sends_of(d: TaskDriver, op: str, failures: list[BaseException]) -> list[int]:
    """Make `d`'s chain fail each `op` it is sent with the next of `failures` (then send it);
    the rounds `op` was tried for."""
    tried: list[int] = []
    original: Callable[[dict[str, Any]], Awaitable[Any]] = d.chain.send

    async def send(tx: dict[str, Any]) -> Any:
        if tx["op"] == op:
            tried.append(tx["round"])
            if failures:
                raise failures.pop(0)
        return await original(tx)
    d.chain.send = send  # type: ignore[method-assign]
    return tried


async def paid_round_zero(world: LedgerWorld) -> FakeNetwork:
    """Both nodes submitted for round 0, its list (50 each) is accepted and paid out, and the
    clock is just past; the network whose store holds the list."""
    for node in NODES:
        world.send(node, slot_in(1, "submission"), "submit", task_id=TASK, round=0,
                   submission=f"proof-0-{node}")
    net = FakeNetwork()
    cid = await FakeContext(net, "someone", TASK).put_blob(
        encode_list({world.acct(n): 50 for n in NODES}))
    view = world.round_view(TASK, 0, slot_in(2, "submission"))
    world.send(view["current_distributor"], slot_in(2, "submission", 1), "submit_distribution",
               task_id=TASK, round=0, root=world.root({n: 50 for n in NODES}), total=100,
               cid=cid)
    world.send("owner", slot_in(2, "idle"), "payout", task_id=TASK, round=0)
    world.at(slot_in(2, "idle", 1))
    return net


@pytest.fixture
async def ready(world: LedgerWorld, tmp_path: Path) -> Any:
    """A's driver in round 1's submission window, its work of round 0 done: a Submit due."""
    world.at(slot_in(1, "submission", 1))
    d = await driver_for(world, "A", tmp_path / "records")
    d.record.worked.add(0)
    try:
        yield d
    finally:
        await d.chain.close()


@pytest.mark.parametrize("exc", [
    ChainUnavailable("down"), LedgerBusy("locked"), QuorumError("1 of 2"),
    OutcomeUnknown("no answer"), NotAdmitted("not yet"), TimeoutError(), trio.TooSlowError(),
    ConnectionResetError(), Refused("outside_window"), Refused("not_ready"),
    Refused("bad_nonce"), ExceptionGroup("store", [QuorumError("short"), OSError()]),
])
def test_transient_failures(exc: BaseException) -> None:
    assert transient(exc)


@pytest.mark.parametrize("exc", [
    TypeError("bad operand"), KeyError("views"), AttributeError("none"), ValueError(),
    AssertionError(), Refused("malformed"), Refused("slashed"), Refused("not_staked"),
    Refused("bad_proof"), Refused("not_auditor"), Refused("insufficient_balance"),
    ExceptionGroup("mixed", [QuorumError("short"), TypeError("bug")]),
])
def test_permanent_failures(exc: BaseException) -> None:
    assert not transient(exc)


@pytest.mark.parametrize("reason", ["outside_window", "not_ready", "bad_nonce"])
async def test_a_transient_refusal_is_tried_again(ready: TaskDriver, world: LedgerWorld,
                                                  reason: str) -> None:
    d = ready
    tried = sends_of(d, "submit", [Refused(reason, "a moment early")])
    with pytest.raises(Refused):  # the run loop backs off and steps again
        await d.step()
    assert 0 not in d.record.submitted and d.metrics["steps_abandoned"] == 0
    await d.step()
    assert tried == [0, 0] and 0 in d.record.submitted
    assert world.acct("A") in world.state.tasks[TASK].rounds[0].submissions
    assert d.metrics["submissions"] == 1 and d.metrics["refused"] == 0


async def test_a_permanent_refusal_is_given_up_for_the_round_once(
        ready: TaskDriver, caplog: pytest.LogCaptureFixture) -> None:
    d = ready
    tried = sends_of(d, "submit", [Refused("not_staked", "stake 10 < min_stake 50")] * 5)
    with caplog.at_level(logging.WARNING, logger="tasks.driver"):
        await d.step()
        await d.step()
    assert tried == [0] and 0 in d.record.submitted
    assert d.metrics["steps_abandoned"] == 1 and d.metrics["refused"] == 1
    lines = [r for r in caplog.records if "not_staked" in r.getMessage()]
    assert len(lines) == 1 and "given up" in lines[0].getMessage()


async def test_a_bug_in_an_action_is_given_up_with_its_traceback(
        ready: TaskDriver, caplog: pytest.LogCaptureFixture) -> None:
    d = ready
    calls: list[int] = []

    async def broken_submit(action: Any, cfg: Any) -> None:
        calls.append(action.round)
        raise TypeError("unsupported operand type(s)")
    d._submit = broken_submit  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="tasks.driver"):
        await d.step()  # not raised: the step goes on and the action is not planned again
        await d.step()
    assert calls == [0] and d.metrics["steps_abandoned"] == 1
    assert d.metrics["steps_failed"] == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].exc_info[0] is TypeError


async def test_a_bug_outside_the_actions_waits_for_the_next_round(
        ready: TaskDriver, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The same look would fail the same way: no backoff loop, the next try is at the next
    round's start (9 s of chain time away here, the clock stands still)."""
    d = ready
    plans: list[int] = []

    def broken_plan(*args: Any, **kwargs: Any) -> Any:
        plans.append(args[1])
        raise AttributeError("'NoneType' object has no attribute 'get'")
    monkeypatch.setattr(driver_module, "plan", broken_plan)
    with caplog.at_level(logging.WARNING, logger="tasks.driver"):
        # without the give-up, the backoff steps again after 1 s
        with trio.move_on_after(1.5):
            await d.run()
    assert len(plans) == 1 and d.metrics["steps_abandoned"] == 1
    assert d.metrics["steps_failed"] == 0
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1


async def test_claimed_rewards_survive_a_restart(world: LedgerWorld, tmp_path: Path) -> None:
    net = await paid_round_zero(world)
    records = tmp_path / "records"
    first = await driver_for(world, "A", records, net)
    try:
        assert await first.claim_now(0) == 50
        assert first.metrics["rewards"] == 50 and first.metrics["claims"] == 1
    finally:
        await first.chain.close()
    again = await driver_for(world, "A", records, net)  # the node restarted
    try:
        assert again.metrics["rewards"] == 50 and again.metrics["claims"] == 1
    finally:
        await again.chain.close()


async def test_a_claim_the_chain_has_and_the_record_lost_is_counted_once(
        world: LedgerWorld, tmp_path: Path) -> None:
    # the node stopped between its claim's inclusion and the record's write: the next step
    # after its restart counts the claim (its amount from the round's list), once
    net = await paid_round_zero(world)
    records = tmp_path / "records"
    first = await driver_for(world, "A", records, net)
    first.record.submitted.add(0)  # (it submitted through the test's world, not its driver)
    first._save_record()

    def stopped() -> None:
        raise KeyboardInterrupt("the node stopped before the record was written")
    first._save_record = stopped  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            await first.claim_now(0)
    finally:
        await first.chain.close()
    assert "A" in world.round_view(TASK, 0, slot_in(2, "idle", 1))["claimed"]  # on chain
    again = await driver_for(world, "A", records, net)  # the node restarted
    try:
        assert again.metrics["claims"] == 0  # the record never had it
        await again.step()
        assert again.metrics["rewards"] == 50 and again.metrics["claims"] == 1
        await again.step()
        assert again.metrics["rewards"] == 50 and again.metrics["claims"] == 1  # once
    finally:
        await again.chain.close()
    last = await driver_for(world, "A", records, net)
    try:
        assert last.metrics["rewards"] == 50 and last.metrics["claims"] == 1
    finally:
        await last.chain.close()


async def test_a_claim_that_landed_before_its_refusal_is_counted(world: LedgerWorld,
                                                                 tmp_path: Path) -> None:
    # an earlier send of the claim timed out here but reached the chain after the step read
    # its views: the chain refuses the claim as already_claimed, and it is counted once
    net = await paid_round_zero(world)
    d = await driver_for(world, "A", tmp_path / "records", net)
    d.record.submitted.add(0)
    original: Callable[[dict[str, Any]], Awaitable[Any]] = d.chain.send
    refusals: list[str] = []

    async def send(tx: dict[str, Any]) -> Any:
        if tx["op"] == "claim":
            await original(tx)  # the earlier send, landing now
            try:
                return await original(tx)
            except Refused as exc:
                refusals.append(exc.reason)
                raise
        return await original(tx)
    d.chain.send = send  # type: ignore[method-assign]
    try:
        await d.step()
        assert refusals == ["already_claimed"]
        assert d.metrics["rewards"] == 50 and d.metrics["claims"] == 1
        await d.step()
        assert d.metrics["rewards"] == 50 and d.metrics["claims"] == 1
    finally:
        await d.chain.close()


async def test_the_record_forgets_rounds_no_window_reaches(world: LedgerWorld,
                                                          tmp_path: Path) -> None:
    """A node that runs for weeks keeps a record of a few rounds, not one of every round."""
    world.at(slot_in(40, "submission", 1))
    records = tmp_path / "records"
    d = await driver_for(world, "A", records)
    try:
        assert d.cfg is not None
        keep = driver_module.RECORD_KEEP_LOOKBACKS * (lookback(d.cfg) + 1)
        old, recent = list(range(0, 40 - keep)), list(range(40 - keep, 40))
        d.record.submitted.update(old + recent)
        d.record.worked.update(old + recent)
        d.record.voted.update((r, 1) for r in old + recent)
        await d.step()  # (it may add round 40's work)
        for rounds in (d.record.submitted, d.record.worked, {r for r, _ in d.record.voted}):
            assert not rounds & set(old) and rounds >= set(recent)
    finally:
        await d.chain.close()
    again = await driver_for(world, "A", records)  # as written to disk
    try:
        assert not again.record.submitted & set(old)
        assert again.record.submitted >= set(recent)
    finally:
        await again.chain.close()


async def test_a_stored_list_this_chain_cannot_hash_is_unreadable_not_a_failure(
        world: LedgerWorld, tmp_path: Path) -> None:
    """The accepted list in the store is what its distributor wrote: accounts this chain's
    leaves cannot hash (here: not EVM addresses) make it unreadable, as a list that does not
    decode is, so the reward book and a claim see no share instead of an exception."""
    net = await paid_round_zero(world)
    d = await driver_for(world, "A", tmp_path / "records", net)
    try:
        d.chain.leaf_format = EVM_LEAVES
        view = await d.chain.round_view(TASK, 0)
        assert await d._share(0, view) is None
        with pytest.raises(Refused) as refused:
            await d.claim_now(0)
        assert refused.value.reason == "bad_proof"
    finally:
        await d.chain.close()
