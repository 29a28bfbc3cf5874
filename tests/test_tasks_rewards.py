# The reward book (tasks/rewards.py) on a real ledger file: what a node can still claim is its
# entry in the accepted list of every paid round it has not claimed, what it claimed per round
# is rebuilt by a fresh book (a restarted node) from the chain and the stored lists, each list
# is read once, final rounds are not looked at again, and the chart window is bounded.
# The node processes' JSON of the same figures: test_task_rewards_process.py.
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain_worlds import LedgerWorld, staked_task_world

from tasks import rewards
from tasks.rewards import Outcome, RewardBook, outcome

NODES = ["A", "B", "C"]
TASK = "count"
S0, ROUND, SUB, AUD = 20, 10, 4, 4


def slot_in(r: int, window: str, offset: int = 0) -> int:
    return S0 + r * ROUND + {"submission": 0, "audit": SUB, "idle": SUB + AUD}[window] + offset


@pytest.fixture
def world(tmp_path: Path) -> Iterator[LedgerWorld]:
    with staked_task_world(tmp_path / "ledger.db", NODES, TASK, "count", start=S0,
                           round_time=ROUND, submission_window=SUB,
                           audit_window=AUD) as w:
        yield w


def submit(w: LedgerWorld, r: int, submitters: list[str]) -> None:
    for node in submitters:
        w.send(node, slot_in(r + 1, "submission"), "submit", task_id=TASK, round=r,
               submission=f"cid-{r}-{node}")


def pay(w: LedgerWorld, r: int, listing: dict[str, int],
        lists: dict[str, dict[str, int]]) -> None:
    """Round r's first distributor lists `listing` (stored in `lists` by its cid); paid out."""
    view = w.round_view(TASK, r, slot_in(r + 2, "submission"))
    cid = f"list-{r}"
    lists[cid] = listing
    w.send(view["current_distributor"], slot_in(r + 2, "submission", 1), "submit_distribution",
           task_id=TASK, round=r, root=w.root(listing), total=sum(listing.values()), cid=cid)
    w.send("owner", slot_in(r + 2, "idle"), "payout", task_id=TASK, round=r)


def claim(w: LedgerWorld, node: str, r: int, lists: dict[str, dict[str, int]],
          slot: int) -> None:
    listing = lists[f"list-{r}"]
    w.send(node, slot, "claim", task_id=TASK, round=r, amount=listing[node],
           proof=w.proofs(listing)[node])


class Reader:
    """share_of for a book: the node's entry in the stored list (lists by cid, entries by
    name); counts the reads."""

    def __init__(self, lists: dict[str, dict[str, int]], node: str) -> None:
        self.lists, self.node, self.reads = lists, node, 0

    async def __call__(self, r: int, view: dict[str, Any]) -> int | None:
        self.reads += 1
        attempt = view["attempts"][view["accepted_attempt"]]
        return self.lists[attempt["cid"]].get(self.node, 0)


@contextlib.contextmanager
def round_views_read(adapter: Any) -> Iterator[list[int]]:
    """The rounds whose views `adapter` is asked for inside the block."""
    looked: list[int] = []
    original = adapter.round_view

    async def watched(task_id: str, r: int) -> dict[str, Any]:
        looked.append(r)
        return await original(task_id, r)
    adapter.round_view = watched
    try:
        yield looked
    finally:
        adapter.round_view = original


async def test_claimable_and_claimed_rebuilt_from_the_chain(world: LedgerWorld) -> None:
    w, lists = world, {}
    submit(w, 0, NODES)
    submit(w, 1, ["A", "B"])
    pay(w, 0, {"A": 60, "B": 40}, lists)  # C accepted, but not listed
    pay(w, 1, {"A": 50, "B": 50}, lists)
    claim(w, "A", 1, lists, slot_in(3, "idle", 1))
    assert outcome(w.round_view(TASK, 0, slot_in(3, "idle", 1)), "A") \
        is Outcome.UNCLAIMED
    current = 3
    adapter = w.adapter("A")
    try:
        reader = Reader(lists, "A")
        book = RewardBook(adapter, TASK, reader)
        await book.refresh(current)
        assert book.claimable == 60 and book.unclaimed == {0: 60}
        assert book.claimed_by_round == {1: 50}
        # each list is read once, and a known unclaimed round's view not again either: only
        # this node's claim changes it, which the driver reports
        with round_views_read(adapter) as looked_at:
            await book.refresh(current)
        assert reader.reads == 2 and book.claimable == 60 and 0 not in looked_at
        # A claims round 0 (as `node.py task claim` does): told at once, then on the chain
        claim(w, "A", 0, lists, slot_in(3, "idle", 2))
        book.claimed(0, 60)
        assert book.claimable == 0 and book.claimed_by_round == {0: 60, 1: 50}
        # a restarted node: a fresh book knows both claims again from the chain
        again = RewardBook(adapter, TASK, Reader(lists, "A"))
        await again.refresh(current)
        assert again.claimable == 0 and again.claimed_by_round == {0: 60, 1: 50}
        # final rounds are not looked at again
        with round_views_read(adapter) as looked:
            await again.refresh(current + 1)
        assert looked == []
        # the chart keeps the last CHART_ROUNDS rounds only
        rewards.CHART_ROUNDS = 3
        await again.refresh(current + 1)
        assert again.claimed_by_round == {1: 50}
    finally:
        rewards.CHART_ROUNDS = 50
        await adapter.close()


async def test_a_node_accepted_but_unlisted_has_nothing_to_claim(world: LedgerWorld) -> None:
    w, lists = world, {}
    submit(w, 0, NODES)
    pay(w, 0, {"A": 60, "B": 40}, lists)
    adapter = w.adapter("C")
    try:
        reader = Reader(lists, "C")
        book = RewardBook(adapter, TASK, reader)
        await book.refresh(3)
        await book.refresh(4)
        assert book.claimable == 0 and book.claimed_by_round == {} and reader.reads == 1
        assert outcome(w.round_view(TASK, 0, slot_in(2, "idle")), "C") \
            is Outcome.UNCLAIMED  # paid and accepted: only its list says it is not paid
    finally:
        await adapter.close()
