# The round engine: what one node should do now for one task, given the chain's slot, the
# round views it asked for and its own record of what it has done (docs/task-rounds.md).
# Sans-IO and pure: no clock, no chain, no store, no trio; the same inputs give the same plan.
# Lives here: the action and event types, the node's `Record` (persisted by the caller), the
# `Misbehaviour` modes of a deliberately bad node (with the inflated list a bad distributor
# sends), `plan` and its helpers (which views to fetch, when to wake up next).
# Must not live here: performing actions (building txs, running task code, sending: the
# driver does), the settlement rules themselves (chain/), any I/O.
#
# Contract with the driver, each time it wakes (at `Plan.wake_slot`, or when the chain moved):
#   views = {r: await chain.round_view(task_id, r) for r in views_needed(cfg, slot, record)}
#   p = plan(cfg, slot, account, record, views, stake=..., misbehaviour=...)
#   for each action in p.actions: perform it, then record.done(action) and persist record
#     (a refusal meaning "already done", e.g. already_submitted, counts as done too, and so
#      does an action given up for its round; an action that failed for a passing reason is
#      not recorded: the next plan emits it again while its window lasts);
#   for each event in p.events: report it, then record.note(event) and persist record.
# An action is emitted only inside its window: Submit(r) only in round r+1's submission
# window, Audit(r) only in its audit window, SubmitDistribution(r, j) only in round r+2+j's
# submission window, VoteDistribution(r, j) only in its audit window. A node restarted later
# resumes at the current round: a past window's action is simply never emitted again.
from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chain.assignment import (
    AUDIT,
    SUBMISSION,
    audit_end,
    auditor_count,
    auditor_order,
    ring_targets,
    round_start,
    window_of,
)
from chain.rules import TaskConfig

# How many rounds back a node looks after a round's work: submit (r+1), distribution attempts
# (r+2 .. r+2+allowed_failed_distributions), then payout (a fallback payer waits one more
# round, which with no idle part of a round ends at the start of the round after) and claim.
EXTRA_LOOKBACK = 4
PAYOUT_FALLBACKS = 3  # after a round without payout, the next distributors in order send it


class Misbehaviour(enum.Enum):
    """A bad node's deliberate fault, to test audits and distribution votes (the node's bad-node
    mode). The engine flags the actions (`Submit.garbage`, `Audit.all_invalid`,
    `SubmitDistribution.inflate`) or leaves them out (no-submission); the driver acts on them."""

    WRONG_SUBMISSION = "wrong-submission"  # submits garbage instead of its proof
    NO_SUBMISSION = "no-submission"  # neither works nor submits (it stays staked)
    FALSE_AUDIT = "false-audit"  # votes every submission it audits invalid
    BAD_DISTRIBUTION = "bad-distribution"  # lists an inflated amount for itself


def inflated(entries: Mapping[str, int], me: str) -> dict[str, int]:
    """A bad distributor's list: it takes the share of the first other listed account."""
    out = dict(entries)
    others = sorted(a for a in out if a != me)
    if others:
        out[me] = out.get(me, 0) + out.pop(others[0])
    return out


def config_of(task_view: Mapping[str, Any]) -> TaskConfig:
    """The task's config from its chain view (`chain.rules.task_view`)."""
    return TaskConfig(**task_view["config"])


def stake_of(task_view: Mapping[str, Any], account: str) -> int:
    """`account`'s stake in the task, from its chain view."""
    return int(task_view.get("stakes", {}).get(account, 0))


def lookback(cfg: TaskConfig) -> int:
    """How many rounds back from the current one the engine still acts for a round's work."""
    return cfg.allowed_failed_distributions + EXTRA_LOOKBACK


# --- actions: what the driver performs --------------------------------------------------


@dataclass(frozen=True)
class RunWork:
    """Run the task's `task(round)` (during `round`)."""

    round: int


@dataclass(frozen=True)
class Submit:
    """Send `submission(round)` as the proof of `round`'s work. `garbage`: bad-node mode."""

    round: int
    garbage: bool = False


@dataclass(frozen=True)
class Audit:
    """Audit `targets`' submissions for `round`; send the invalid ones (none: no tx needed).
    `all_invalid`: bad-node mode, vote every target invalid without looking."""

    round: int
    targets: tuple[str, ...]
    all_invalid: bool = False


@dataclass(frozen=True)
class SubmitDistribution:
    """Compute `round`'s distribution list, store it, send its root (this node is the
    distributor of `attempt`). `inflate`: bad-node mode, list more for itself."""

    round: int
    attempt: int
    inflate: bool = False


@dataclass(frozen=True)
class VoteDistribution:
    """Recompute `round`'s list, compare with the root of `attempt`; vote against if differs."""

    round: int
    attempt: int


@dataclass(frozen=True)
class Payout:
    """Send `payout(round)` (the list's total moves to the round's claimable funds)."""

    round: int


@dataclass(frozen=True)
class Claim:
    """Claim this node's amount of `round` with its Merkle proof (nothing when not listed)."""

    round: int


@dataclass(frozen=True)
class CountClaim:
    """Count this node's claim of `round` in its record: the chain has it, the record not (the
    node stopped between the two)."""

    round: int


Action = (RunWork | Submit | Audit | SubmitDistribution | VoteDistribution | Payout | Claim
          | CountClaim)


class EventKind(enum.Enum):
    REJECTED = "rejected"  # this node's submission for the round was rejected (slashed)
    UNPAID = "unpaid"  # accepted, but the round pays nothing (every distribution attempt failed)
    NOT_STAKED = "not_staked"  # could not submit: stake below the task's minimum


CLOSING = frozenset({EventKind.REJECTED, EventKind.UNPAID})


@dataclass(frozen=True)
class Event:
    """Something to report. Closing events end the node's business with `round`."""

    kind: EventKind
    round: int
    detail: str = ""


# --- the node's record --------------------------------------------------------------------


@dataclass
class Record:
    """What this node has done for one task, by round. The caller persists it after every
    change (to_dict / from_dict), so a restarted node never repeats an action."""

    worked: set[int] = field(default_factory=set)
    submitted: set[int] = field(default_factory=set)
    audited: set[int] = field(default_factory=set)
    distributed: set[tuple[int, int]] = field(default_factory=set)
    voted: set[tuple[int, int]] = field(default_factory=set)
    paid: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    unstaked_noted: set[int] = field(default_factory=set)
    # this node's claims over the task's whole life, and what they took (its status and
    # metrics: the chain keeps who claimed a round, not how much; never pruned)
    claims: int = 0
    rewards_claimed: int = 0

    def rewarded(self, amount: int) -> None:
        """Note a claim of `amount` included on the chain."""
        self.claims += 1
        self.rewards_claimed += amount

    def done(self, action: Action) -> None:
        """Note that `action` was performed (or found already done, or refused for good)."""
        match action:
            case RunWork(round=r):
                self.worked.add(r)
            case Submit(round=r):
                self.submitted.add(r)
            case Audit(round=r):
                self.audited.add(r)
            case SubmitDistribution(round=r, attempt=j):
                self.distributed.add((r, j))
            case VoteDistribution(round=r, attempt=j):
                self.voted.add((r, j))
            case Payout(round=r):
                self.paid.add(r)
            case Claim(round=r) | CountClaim(round=r):
                self.claimed.add(r)
                self.closed.add(r)

    def note(self, event: Event) -> None:
        """Note that `event` was reported (so it is not reported again)."""
        if event.kind in CLOSING:
            self.closed.add(event.round)
        elif event.kind is EventKind.NOT_STAKED:
            self.unstaked_noted.add(event.round)

    def prune(self, before_round: int) -> None:
        """Forget rounds before `before_round` (older than any window the engine looks at:
        pass `current round - lookback(cfg) - 1` or less)."""
        for name in ("worked", "submitted", "audited", "paid", "claimed", "closed",
                     "unstaked_noted"):
            rounds: set[int] = getattr(self, name)
            rounds.difference_update({r for r in rounds if r < before_round})
        for pairs in (self.distributed, self.voted):
            pairs.difference_update({p for p in pairs if p[0] < before_round})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"claims": self.claims, "rewards_claimed": self.rewards_claimed}
        for name in ("worked", "submitted", "audited", "paid", "claimed", "closed",
                     "unstaked_noted"):
            out[name] = sorted(getattr(self, name))
        out["distributed"] = [list(p) for p in sorted(self.distributed)]
        out["voted"] = [list(p) for p in sorted(self.voted)]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        def rounds(name: str) -> set[int]:
            return {int(r) for r in data.get(name, [])}

        def pairs(name: str) -> set[tuple[int, int]]:
            return {(int(p[0]), int(p[1])) for p in data.get(name, [])}

        return cls(
            worked=rounds("worked"), submitted=rounds("submitted"), audited=rounds("audited"),
            distributed=pairs("distributed"), voted=pairs("voted"), paid=rounds("paid"),
            claimed=rounds("claimed"), closed=rounds("closed"),
            unstaked_noted=rounds("unstaked_noted"),
            claims=int(data.get("claims", 0)),
            rewards_claimed=int(data.get("rewards_claimed", 0)),
        )


# --- round views --------------------------------------------------------------------------
# The engine reads `chain.rules.round_view(state, task_id, r, slot)` (what the adapter's
# `round_view(task_id, r)` returns): "submissions", "seed", "accepted" (None until round r+1's
# audit window is over), "rejected", "attempts" (each with "attempt", "distributor",
# "votes_against", "status"), "current_attempt", "current_distributor", "distributors",
# "accepted_attempt", "paid", "claimed".


_RINGS: OrderedDict[bytes, tuple[list[str], dict[str, int]]] = OrderedDict()
_RINGS_KEPT = 64


def _ring_positions(key: bytes, seed: bytes,
                    submitters: list[str]) -> tuple[list[str], dict[str, int]]:
    """The auditor ring of a round: O(n) once per round, shared by every caller in the
    process (a simulation runs many nodes' engines). Kept by the view's ring key, which names
    the seed and the submitters (the seed alone names only the texts submitted: two rounds
    of equal texts by other nodes share it), so a lookup costs nothing per account."""
    ring = _RINGS.get(key)
    if ring is None:
        order = auditor_order(seed, submitters)
        ring = _RINGS[key] = order, {account: i for i, account in enumerate(order)}
        if len(_RINGS) > _RINGS_KEPT:
            _RINGS.popitem(last=False)
    return ring


def audit_targets(view: Mapping[str, Any], account: str, max_auditors: int) -> list[str]:
    """Whom `account` audits in the round of `view` (chain.assignment.targets_of, memoised).
    `view["submitters"]` lists the submitters in inclusion order (their indices)."""
    if account not in view["submissions"]:
        return []
    order, position = _ring_positions(bytes(view["ring_key"]), bytes(view["seed"]),
                                      list(view["submitters"]))
    k = auditor_count(len(order), max_auditors)
    return ring_targets(order, position[account], k)


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    events: tuple[Event, ...]
    wake_slot: int  # the next window boundary: ask again then (or when the chain moves)


def next_boundary(cfg: TaskConfig, slot: int) -> int:
    """The first slot after `slot` where the round or window changes."""
    if slot < cfg.start_slot:
        return cfg.start_slot
    r, _ = window_of(cfg, slot)
    start = round_start(cfg, r)
    for edge in (start + cfg.submission_window, audit_end(cfg, r)):
        if edge > slot:
            return edge
    return round_start(cfg, r + 1)


def views_needed(cfg: TaskConfig, slot: int, record: Record) -> list[int]:
    """The rounds whose views `plan` needs now (newest first): the rounds this node submitted
    for that are still open, within the lookback."""
    current, _ = window_of(cfg, slot)
    out = []
    for r in range(current - 1, max(-1, current - 1 - lookback(cfg)), -1):
        if r in record.submitted and r not in record.closed:
            out.append(r)
    return out


def plan(
    cfg: TaskConfig,
    slot: int,
    account: str,
    record: Record,
    views: Mapping[int, Mapping[str, Any]],
    *,
    stake: int | None = None,
    misbehaviour: Misbehaviour | None = None,
) -> Plan:
    """What to do at `slot`. `views`: round -> round view, for `views_needed` (a missing
    one only delays what depends on it). `stake`: this node's stake in the task (None: do
    not check; the chain refuses an unstaked submit anyway)."""
    wake = next_boundary(cfg, slot)
    current, window = window_of(cfg, slot)
    if current < 0:
        return Plan((), (), wake)
    actions: list[Action] = []
    events: list[Event] = []
    bad = misbehaviour

    if current not in record.worked and bad is not Misbehaviour.NO_SUBMISSION:
        actions.append(RunWork(current))

    prev = current - 1
    if (window == SUBMISSION and prev >= 0 and prev in record.worked
            and prev not in record.submitted and bad is not Misbehaviour.NO_SUBMISSION):
        if stake is not None and stake < cfg.min_stake:
            if prev not in record.unstaked_noted:
                events.append(Event(EventKind.NOT_STAKED, prev,
                                    f"stake {stake} < min_stake {cfg.min_stake}"))
        else:
            actions.append(Submit(prev, garbage=bad is Misbehaviour.WRONG_SUBMISSION))

    for r in views_needed(cfg, slot, record):
        view = views.get(r)
        if view is None:
            continue
        _plan_round(cfg, slot, current, window, account, record, r, view, bad, actions,
                    events)
    return Plan(tuple(actions), tuple(events), wake)


def _plan_round(
    cfg: TaskConfig, slot: int, current: int, window: str, account: str, record: Record,
    r: int, view: Mapping[str, Any], bad: Misbehaviour | None, actions: list[Action],
    events: list[Event],
) -> None:
    submissions = view["submissions"]
    if account not in submissions:
        if current >= r + 2:  # the set of submissions is final and ours is not in it
            events.append(Event(EventKind.UNPAID, r, "no submission of ours on chain"))
        return
    if current == r + 1:
        if window == AUDIT and r not in record.audited and account not in view["audited"]:
            targets = audit_targets(view, account, cfg.max_auditors)
            if targets:
                actions.append(Audit(r, tuple(targets),
                                     all_invalid=bad is Misbehaviour.FALSE_AUDIT))
        return
    accepted = view["accepted"]
    if accepted is None:
        return  # results not known yet (cannot happen past round r+1 with a current view)
    if account in (view["rejected"] or ()):
        events.append(Event(EventKind.REJECTED, r, "submission rejected by its auditors"))
        return
    if view["paid"]:
        if r not in record.claimed:
            actions.append(CountClaim(r) if account in view["claimed"] else Claim(r))
        return
    accepted_attempt = view["accepted_attempt"]
    attempts = {a["attempt"]: a for a in view["attempts"]}
    if accepted_attempt is not None:
        accepted_round = r + 2 + accepted_attempt
        if slot >= audit_end(cfg, accepted_round) and r not in record.paid:
            # the accepted distributor pays out; if it has not a round later, the next
            # PAYOUT_FALLBACKS accounts of the distribution order do (refusals are harmless)
            order = view["distributors"]
            payers = {attempts[accepted_attempt]["distributor"]}
            if slot >= audit_end(cfg, accepted_round) + cfg.round_time and order:
                payers |= {order[(accepted_attempt + i) % len(order)]
                           for i in range(1, PAYOUT_FALLBACKS + 1)}
            if account in payers:
                actions.append(Payout(r))
        return
    attempt = view["current_attempt"]
    if attempt is None:
        if current > r + 2 + cfg.allowed_failed_distributions:
            events.append(Event(EventKind.UNPAID, r, "every distribution attempt failed"))
        return
    sent = attempts.get(attempt)
    if window == SUBMISSION and sent is None:
        if view["current_distributor"] == account and (r, attempt) not in record.distributed:
            actions.append(SubmitDistribution(
                r, attempt, inflate=bad is Misbehaviour.BAD_DISTRIBUTION))
    elif window == AUDIT and sent is not None and sent["distributor"] != account:
        if (r, attempt) not in record.voted and account not in sent["votes_against"]:
            actions.append(VoteDistribution(r, attempt))
