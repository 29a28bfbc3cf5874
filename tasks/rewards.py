# This node's rewards in one task, for the status, the HTTP API and the dashboard: what it
# claimed per round over the last CHART_ROUNDS rounds, and what it can still claim (its entry
# in the accepted distribution list of every paid round it has not claimed, over the last
# CLAIM_WINDOW rounds). Both are rebuilt from durable data, the chain's round views and the
# lists in the replicated store, so a restarted node shows them again; the driver refreshes
# the book once a round and tells it of its own claims at once. A round whose outcome for this
# node is final is not looked at again, and each list is read once (its entry is kept).
# Lives here: `RewardBook` and the pure `outcome` of a round view for an account.
# Must not live here: reading or checking a list (tasks/driver.py gives `share_of`), claiming
# (tasks/engine.py decides, the driver sends), HTTP (tasknet_node/).
from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from chain.adapter import ChainAdapter

CHART_ROUNDS = 50  # rounds of claimed rewards kept (the dashboard charts the last 20)
CLAIM_WINDOW = 500  # rounds back that claimable rewards are looked for


class Outcome(enum.Enum):
    OPEN = "open"  # not settled, or accepted and not paid yet: may still change
    NONE = "none"  # this node is not paid in the round (did not submit, or rejected): final
    UNCLAIMED = "unclaimed"  # paid, this node accepted, not claimed yet
    CLAIMED = "claimed"  # this node claimed its entry: final


def outcome(view: Mapping[str, Any], account: str) -> Outcome:
    """What round `view` (`chain.rules.round_view` at the current slot) means for `account`."""
    if account in view["claimed"]:
        return Outcome.CLAIMED
    if not view["settled"]:
        return Outcome.OPEN
    if account not in (view["accepted"] or ()):
        return Outcome.NONE
    return Outcome.UNCLAIMED if view["paid"] else Outcome.OPEN


class RewardBook:
    """This node's claimed and claimable rewards in one task.

    `share_of(r, view)` is this node's amount in round r's accepted list (0 when it is not
    listed), None while the list cannot be read (asked again at the next refresh)."""

    def __init__(self, chain: ChainAdapter, task_id: str,
                 share_of: Callable[[int, dict[str, Any]], Awaitable[int | None]]) -> None:
        self.chain = chain
        self.task_id = task_id
        self._share_of = share_of
        self.claimed_by_round: dict[int, int] = {}  # round -> what this node claimed
        self.unclaimed: dict[int, int] = {}  # round -> what it can still claim
        self._shares: dict[int, int] = {}  # round -> its entry in the accepted list
        self._final: set[int] = set()  # rounds not to look at again
        self.refreshed_at: int | None = None  # the current round of the last refresh

    @property
    def claimable(self) -> int:
        return sum(self.unclaimed.values())

    def by_round(self) -> dict[str, int]:
        """What this node claimed per round, oldest first, keyed for JSON (the chart)."""
        return {str(r): amount for r, amount in sorted(self.claimed_by_round.items())}

    def claimed(self, r: int, amount: int) -> None:
        """This node's claim of `amount` for round r was included."""
        self.unclaimed.pop(r, None)
        self._shares[r] = amount
        self._final.add(r)
        self.claimed_by_round[r] = amount
        for old in sorted(self.claimed_by_round)[:-CHART_ROUNDS]:
            del self.claimed_by_round[old]

    async def refresh(self, current: int) -> None:
        """Look again at the rounds before `current` (the chain's current round) whose outcome
        for this node may still change, and forget rounds out of the windows."""
        view = await self.chain.task(self.task_id)
        if view is None:
            return
        me = self.chain.account
        for r in sorted(view["rounds"], reverse=True):
            # a known unclaimed entry changes only by this node's claim, which the driver
            # reports (`claimed`): not read again each round
            if r >= current or r in self._final or r in self.unclaimed:
                continue
            if r < current - CLAIM_WINDOW:
                break
            round_view = await self.chain.round_view(self.task_id, r)
            seen = outcome(round_view, me)
            if seen is Outcome.NONE or (seen is Outcome.CLAIMED
                                        and r < current - CHART_ROUNDS):
                self._final.add(r)
            elif seen in (Outcome.CLAIMED, Outcome.UNCLAIMED):
                share = await self._share(r, round_view)
                if share is None or r in self._final:  # unreadable, or claimed meanwhile
                    continue
                if seen is Outcome.CLAIMED:
                    self.claimed(r, share)
                elif share > 0:
                    self.unclaimed[r] = share
                else:
                    self._final.add(r)  # accepted but not listed: nothing to claim
        self._forget_before(current)
        self.refreshed_at = current

    async def _share(self, r: int, view: dict[str, Any]) -> int | None:
        if r not in self._shares:
            share = await self._share_of(r, view)
            if share is None:
                return None
            self._shares[r] = share
        return self._shares[r]

    def _forget_before(self, current: int) -> None:
        chart_from, claim_from = current - CHART_ROUNDS, current - CLAIM_WINDOW
        for r in [r for r in self.claimed_by_round if r < chart_from]:
            del self.claimed_by_round[r]
        for r in [r for r in self.unclaimed if r < claim_from]:
            del self.unclaimed[r]
        for r in [r for r in self._shares if r < claim_from]:
            del self._shares[r]
        self._final = {r for r in self._final if r >= claim_from}
