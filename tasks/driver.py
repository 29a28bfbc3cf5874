# The node side of task rounds: a trio loop per task that asks the sans-IO engine what to do
# at the chain's current slot, runs the task's code for it, sends the transactions through the
# chain adapter, persists what it did, and reports one line per round.
# Lives here: `TaskDriver` (performing each engine action: work, submission, audits,
# distribution lists and their votes, payout, claims), the per-round summary line, the
# record file (DATA_DIR/tasks/<task id>.record.json, written atomically once a step and at
# each claim, with the claims and rewards counted over restarts),
# keeping its `tasks.rewards.RewardBook` fresh (`keep_rewards`: once a round; and at claims),
# and what a failed step means (`transient`: tried again with backoff while its window lasts;
# anything else is given up for the round, logged once and counted as abandoned).
# Must not live here: what to do when (tasks/engine.py decides), the rules (chain/), the
# store or the task context's I/O (tasks/context.py), HTTP (tasknet_node/).
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from chain.adapter import ChainAdapter, ChainUnavailable
from chain.assignment import round_of, round_start
from chain.merkle import distribution_proof, distribution_root
from chain.rules import Refused, TaskConfig
from kv.config import NotAdmitted, QuorumError

from .api import Task, TaskContext
from .engine import (
    Audit,
    Claim,
    CountClaim,
    Event,
    Misbehaviour,
    Payout,
    Record,
    RunWork,
    Submit,
    SubmitDistribution,
    VoteDistribution,
    config_of,
    inflated,
    lookback,
    plan,
    stake_of,
    views_needed,
)
from .rewards import RewardBook
from .runner import run_task_call

log = logging.getLogger(__name__)

# refusals that only mean the action happened already: recorded as done, not logged as faults
DONE_REFUSALS = frozenset({"already_submitted", "already_voted", "already_paid",
                           "already_claimed", "distribution_exists"})
# refusals that time or a retry clears while the action is still planned: a window not open
# yet at the slot the chain applied (or closed: then the engine plans it no more), a payout or
# claim a moment early, another writer of this account taking the nonce. The step is tried
# again; every other refusal is the rules' verdict for the round and is given up.
TRANSIENT_REFUSALS = frozenset({"outside_window", "not_ready", "bad_nonce"})
# failures that say nothing about the action itself: the chain or the store not answering
# (a ledger lock held, a quorum short while members rejoin, this node not admitted yet), a
# timeout, the network
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ChainUnavailable, QuorumError, NotAdmitted, TimeoutError, trio.TooSlowError, OSError,
    trio.BrokenResourceError)
MAX_WAIT_S = 2.0  # the longest the loop sleeps without looking at the chain again
STEP_RETRY_MAX_S = 8.0  # a step that keeps failing is tried again at least this often
GARBAGE_SUBMISSION = "not-a-proof"
# the record keeps this many lookbacks of rounds (the engine acts within one): a long-running
# node's record stays the size of a few rounds instead of growing by every round it ran
RECORD_KEEP_LOOKBACKS = 2


def transient(exc: BaseException) -> bool:
    """Whether trying the failed step again can succeed (docs/task-rounds.md, "When a step
    fails"); False for a refusal the rules will repeat and for errors of our own code."""
    if isinstance(exc, Refused):
        return exc.reason in TRANSIENT_REFUSALS
    if isinstance(exc, BaseExceptionGroup):
        return all(transient(e) for e in exc.exceptions)
    return isinstance(exc, TRANSIENT_ERRORS)


def encode_list(entries: Mapping[str, int]) -> bytes:
    """The distribution list as stored in the replicated store (canonical msgpack)."""
    return msgpack.packb(sorted(entries.items()), use_bin_type=True)


def decode_list(data: bytes) -> dict[str, int]:
    items = msgpack.unpackb(data, raw=False)
    if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 2 and isinstance(i[0], str)
            and type(i[1]) is int and i[1] >= 0 for i in items):
        raise ValueError("not a distribution list")
    return {account: amount for account, amount in items}


@dataclass
class RoundSummary:
    """What this node did in one chain round for one task, for its progress line."""

    parts: list[str] = field(default_factory=list)

    def line(self, round: int, name: str) -> str:
        return f"round {round} {name}: " + (", ".join(self.parts) if self.parts else "idle")


class TaskDriver:
    """Runs one task on this node until cancelled."""

    def __init__(self, chain: ChainAdapter, task_id: str, task: Task, ctx: TaskContext,
                 record_dir: Path, *, misbehaviour: Misbehaviour | None = None,
                 say: Callable[[str], None] = print,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.chain = chain
        self.task_id = task_id
        self.task = task
        self.ctx = ctx
        self.misbehaviour = misbehaviour
        self.say = say
        self.on_event = on_event
        self.record_path = record_dir / f"{_safe(task_id)}.record.json"
        self.record = self._load_record()
        self.cfg: TaskConfig | None = None
        self.name = task_id
        self.current_round: int | None = None
        self.summary = RoundSummary()
        self.metrics: dict[str, int] = {
            "work_failed": 0, "submissions": 0, "audits": 0, "votes_against_sent": 0,
            "distributions": 0, "claims": 0, "rewards": 0, "refused": 0,
            "chain_unavailable": 0, "steps_failed": 0, "steps_abandoned": 0,
        }
        # a node's claims and rewards are counted over restarts (its record keeps them)
        self.metrics["claims"] = self.record.claims
        self.metrics["rewards"] = self.record.rewards_claimed
        self.last: dict[str, Any] = {}  # last submission, audit results, claims (status)
        # what this node claimed by round and can still claim, rebuilt from the chain
        self.rewards = RewardBook(chain, task_id, self._share)

    # -- record -----------------------------------------------------------------------------
    def _load_record(self) -> Record:
        try:
            return Record.from_dict(json.loads(self.record_path.read_text()))
        except FileNotFoundError:
            return Record()
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RuntimeError(f"cannot read {self.record_path}: {exc}; move it away to "
                               "start this task's record afresh") from None

    def _save_record(self) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.record.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.record_path)

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        view = await self.chain.task(self.task_id)
        if view is None:
            raise RuntimeError(f"task {self.task_id} is not on the chain")
        self.cfg = config_of(view)
        self.name = self.cfg.name or self.task_id
        result = await run_task_call(self.task.setup, timeout=30.0, name=f"{self.name} setup",
                                     logger=self.ctx.log)
        if not result.ok:
            self.say(f"task {self.name}: setup failed ({result.error}); rounds go on")
        failures = 0  # steps failed in a row
        while True:
            try:
                wake_slot = await self.step()
            except ChainUnavailable as exc:
                self.metrics["chain_unavailable"] += 1
                log.warning("task %s: chain unavailable (%s); retrying", self.name, exc)
                await trio.sleep(1.0)
                continue
            except Exception as exc:
                if not transient(exc):
                    # a fault of ours (or a refused read) outside any one action: the same
                    # look fails the same way, so nothing more is tried until the next round
                    self.metrics["steps_abandoned"] += 1
                    log.error("task %s: a step failed for good (%s: %s); nothing more is "
                              "tried in this round", self.name, type(exc).__name__, exc,
                              exc_info=True)
                    failures = 0
                    await trio.sleep(await self._seconds_to_next_round())
                    continue
                # the store short of a quorum while members rejoin (a distribution list not
                # stored, a list not read), the chain refusing a moment early: the step's
                # unfinished actions are planned again at the next look, as long as their
                # windows last; the task never stops for it
                failures += 1
                self.metrics["steps_failed"] += 1
                log.warning("task %s: a step failed (%s: %s); trying again", self.name,
                            type(exc).__name__, exc, exc_info=failures == 1)
                await trio.sleep(min(STEP_RETRY_MAX_S, 0.5 * 2 ** min(failures, 5)))
                continue
            failures = 0
            await self._sleep_until(wake_slot)

    async def _seconds_to_next_round(self) -> float:
        """How long until the chain's next round starts (from its slots, not our clock);
        STEP_RETRY_MAX_S when the chain cannot say."""
        assert self.cfg is not None
        try:
            slot = await self.chain.now()
        except Exception:  # the chain's trouble shows at the next step
            return STEP_RETRY_MAX_S
        r = round_of(self.cfg, slot)
        next_start = self.cfg.start_slot if r is None else round_start(self.cfg, r + 1)
        return max(0.01, (next_start - slot) * self.chain.slot_ms / 1000.0)

    async def keep_rewards(self) -> None:
        """Beside `run`, until cancelled: refresh the reward book whenever the chain's round
        changes (at start too: that rebuilds it after a restart). Its failures never stop the
        rounds; it tries again at the next look."""
        while True:
            try:
                current = None if self.cfg is None else round_of(self.cfg, await self.chain.now())
                if current is not None and current != self.rewards.refreshed_at:
                    await self.rewards.refresh(current)
            except Exception as exc:  # the chain or the store; the status only lags
                log.warning("task %s: rewards not refreshed (%s: %s)", self.name,
                            type(exc).__name__, exc)
            await trio.sleep(MAX_WAIT_S)

    async def step(self) -> int:
        """One look at the chain and everything due now; returns the slot to wake at."""
        assert self.cfg is not None
        cfg = self.cfg
        slot = await self.chain.now()
        chain_round = round_of(cfg, slot)
        if chain_round is not None and chain_round != self.current_round:
            if self.current_round is not None and self.summary.parts:
                self.say(self.summary.line(self.current_round, self.name))
            self.current_round, self.summary = chain_round, RoundSummary()
        view = await self.chain.task(self.task_id)
        stake = stake_of(view, self.chain.account) if view is not None else 0
        views = {r: await self.chain.round_view(self.task_id, r)
                 for r in views_needed(cfg, slot, self.record)}
        decided = plan(cfg, slot, self.chain.account, self.record, views, stake=stake,
                       misbehaviour=self.misbehaviour)
        # the record is written once a step (an fsync costs about 1 ms of CPU), also when an
        # action failed after others were done; a crash in between repeats an action the
        # chain then refuses (a second submission, vote or claim for the round)
        changed = False
        try:
            for action in decided.actions:
                try:
                    await self._perform(action, views, cfg)
                except Exception as exc:
                    if transient(exc):
                        raise  # tried again with the whole step (run's backoff)
                    self._abandon(action, exc)
                self.record.done(action)
                changed = True
            for event in decided.events:
                self._report(event)
                self.record.note(event)
                changed = True
        finally:
            if changed:
                if chain_round is not None:  # rounds no window reaches any more: forgotten
                    self.record.prune(chain_round - RECORD_KEEP_LOOKBACKS * (lookback(cfg) + 1))
                self._save_record()
        return decided.wake_slot

    def _abandon(self, action: Any, exc: Exception) -> None:
        """`action` failed in a way no retry mends: given up for its round (the caller records
        it done, so it is not planned again), logged once and counted."""
        self.metrics["steps_abandoned"] += 1
        why = exc.reason if isinstance(exc, Refused) else type(exc).__name__
        self.summary.parts.append(f"{type(action).__name__} for round {action.round} given up "
                                  f"({why})")
        if isinstance(exc, Refused):
            self.metrics["refused"] += 1
            log.warning("task %s: %s for round %d refused: %s (%s); given up for the round",
                        self.name, type(action).__name__, action.round, exc.reason,
                        exc.detail)
        else:
            log.error("task %s: %s for round %d failed (%s: %s); given up for the round",
                      self.name, type(action).__name__, action.round, type(exc).__name__,
                      exc, exc_info=exc)

    async def _sleep_until(self, wake_slot: int) -> None:
        wake_at = wake_slot * self.chain.slot_ms / 1000.0
        await trio.sleep(min(MAX_WAIT_S, max(0.01, wake_at - time.time() + 0.005)))

    def _report(self, event: Event) -> None:
        self.summary.parts.append(f"{event.kind.value.lower()} for round {event.round}"
                                  + (f" ({event.detail})" if event.detail else ""))
        if self.on_event is not None:
            self.on_event(self.task_id, {"kind": event.kind.value, "round": event.round,
                                         "detail": event.detail})

    # -- actions ----------------------------------------------------------------------------
    async def _send(self, tx: dict[str, Any]) -> dict[str, Any] | None:
        """Send a transaction; None when the chain says it was done already. Any other
        refusal is raised: `step` tries a transient one again and gives up the others."""
        try:
            receipt = await self.chain.send({**tx, "task_id": self.task_id})
        except Refused as exc:
            if exc.reason in DONE_REFUSALS:
                return None
            raise
        return receipt.result

    def _seconds_left(self, cfg: TaskConfig, round: int, window_end: int) -> float:
        end_slot = cfg.start_slot + round * cfg.round_time + window_end
        return max(0.05, end_slot * self.chain.slot_ms / 1000.0 - time.time())

    async def _perform(self, action: Any, views: dict[int, dict[str, Any]],
                       cfg: TaskConfig) -> None:
        self.ctx_round(action.round)
        if isinstance(action, RunWork):
            result = await run_task_call(
                self.task.task, action.round, name=f"{self.name} task({action.round})",
                timeout=self._seconds_left(cfg, action.round, cfg.round_time),
                logger=self.ctx.log)
            if not result.ok:
                self.metrics["work_failed"] += 1
                self.summary.parts.append(f"work failed ({result.error})")
        elif isinstance(action, Submit):
            await self._submit(action, cfg)
        elif isinstance(action, Audit):
            await self._audit(action, views[action.round], cfg)
        elif isinstance(action, SubmitDistribution):
            await self._distribute(action, views[action.round], cfg)
        elif isinstance(action, VoteDistribution):
            await self._vote(action, views[action.round], cfg)
        elif isinstance(action, Payout):
            await self._send({"op": "payout", "round": action.round})
        elif isinstance(action, Claim):
            await self._claim(action, views[action.round])
        elif isinstance(action, CountClaim):
            await self._count_claim(action.round, views[action.round])

    def ctx_round(self, round: int) -> None:
        setter = getattr(self.ctx, "set_round", None)
        if setter is not None:
            setter(round)

    async def _submit(self, action: Submit, cfg: TaskConfig) -> None:
        r = action.round
        if action.garbage:
            value: Any = GARBAGE_SUBMISSION
        else:
            result = await run_task_call(
                self.task.submission, r, name=f"{self.name} submission({r})",
                timeout=self._seconds_left(cfg, r + 1, cfg.submission_window),
                is_submission=True, logger=self.ctx.log)
            if not result.ok:
                self.summary.parts.append(f"no submission for round {r} ({result.error})")
                return
            value = result.value
        if await self._send({"op": "submit", "round": r, "submission": value}) is not None:
            self.metrics["submissions"] += 1
            self.summary.parts.append("submitted")
            self.last["submission"] = {"round": r, "value": value}

    async def _audit(self, action: Audit, view: dict[str, Any], cfg: TaskConfig) -> None:
        r = action.round
        submissions: dict[str, str] = view["submissions"]
        invalid: list[str] = []
        deadline = self._seconds_left(cfg, r + 1, cfg.submission_window + cfg.audit_window)
        for target in action.targets:
            if action.all_invalid:
                invalid.append(target)
                continue
            node = await self.chain.node_of(target)
            if node is None:  # no node of ours stands behind this account: nothing to check
                log.info("task %s: %s has no checked node id; its submission is invalid",
                         self.name, target)
                invalid.append(target)
                continue
            result = await run_task_call(
                self.task.audit, submissions.get(target, ""), r, node,
                name=f"{self.name} audit({target})", timeout=deadline, logger=self.ctx.log)
            # our own audit code failing is no verdict against the submitter
            if result.ok and result.value is False:
                invalid.append(target)
        self.metrics["audits"] += len(action.targets)
        if invalid:
            if await self._send({"op": "audit", "round": r, "invalid": invalid}) is not None:
                self.metrics["votes_against_sent"] += len(invalid)
        valid = len(action.targets) - len(invalid)
        self.summary.parts.append(f"audited {len(action.targets)} ({valid} valid)")
        self.last["audit"] = {"round": r, "audited": len(action.targets), "valid": valid,
                              "invalid": invalid}

    async def _honest_list(self, view: dict[str, Any], cfg: TaskConfig,
                           r: int) -> dict[str, int] | None:
        accepted = sorted(view["accepted"] or [])
        result = await run_task_call(
            self.task.distribution, accepted, cfg.bounty_per_round, r,
            name=f"{self.name} distribution({r})", timeout=10.0, logger=self.ctx.log)
        if not result.ok or not isinstance(result.value, dict):
            return None
        entries = {str(k): v for k, v in result.value.items()}
        if not all(type(v) is int and v >= 0 for v in entries.values()):
            self.ctx.log.error("distribution(%d) returned amounts that are not whole numbers",
                               r)
            return None
        return {a: v for a, v in entries.items() if v > 0}

    async def _distribute(self, action: SubmitDistribution, view: dict[str, Any],
                          cfg: TaskConfig) -> None:
        r = action.round
        entries = await self._honest_list(view, cfg, r)
        if entries is None:
            self.summary.parts.append(f"no distribution for round {r} (task code failed)")
            return
        if action.inflate:
            entries = inflated(entries, self.chain.account)
        cid = await self.ctx.put_blob(encode_list(entries))
        root = distribution_root(entries, self.chain.leaf_format)
        result = await self._send({"op": "submit_distribution", "round": r, "root": root,
                                   "total": sum(entries.values()), "cid": cid})
        if result is not None:
            self.metrics["distributions"] += 1
            self.summary.parts.append(f"distribution for round {r} sent")

    async def _vote(self, action: VoteDistribution, view: dict[str, Any],
                    cfg: TaskConfig) -> None:
        r = action.round
        attempt = next((a for a in view["attempts"] if a["attempt"] == action.attempt), None)
        if attempt is None:
            return
        entries = await self._honest_list(view, cfg, r)
        if entries is None:
            return  # no verdict without our own list
        if attempt["root"] != distribution_root(entries, self.chain.leaf_format) \
                or attempt["total"] != sum(entries.values()):
            if await self._send({"op": "audit_distribution", "round": r}) is not None:
                self.summary.parts.append(f"voted against the distribution of round {r}")

    async def _accepted_list(self, r: int, view: dict[str, Any]) -> dict[str, int] | None:
        """Round r's accepted distribution list, read from the store and checked against its
        root on the chain; None when there is none or it cannot be read or checked."""
        attempt = next((a for a in view["attempts"]
                        if a["attempt"] == view["accepted_attempt"]), None)
        if attempt is None:
            return None
        try:
            entries = decode_list(await self.ctx.get_blob(attempt["cid"]))
            # whoever wrote the list chose its accounts: one this chain cannot hash (not an
            # EVM address) makes it unreadable too, not a failure of the step or the book
            root = distribution_root(entries, self.chain.leaf_format)
        except (KeyError, ValueError) as exc:
            log.warning("task %s: the distribution list of round %d is unreadable (%s)",
                        self.name, r, exc)
            return None
        if root != attempt["root"]:
            log.warning("task %s: the stored list of round %d does not match its root",
                        self.name, r)
            return None
        return entries

    async def _share(self, r: int, view: dict[str, Any]) -> int | None:
        """This node's amount in round r's accepted list (0: not listed); None when the list
        cannot be read or checked (for the reward book)."""
        entries = await self._accepted_list(r, view)
        return None if entries is None else entries.get(self.chain.account, 0)

    async def _my_share(self, r: int, view: dict[str, Any]) -> tuple[int, list[bytes]] | None:
        """This node's amount in round r's accepted list and its proof; None when the list
        cannot be read or checked, or does not list this node."""
        entries = await self._accepted_list(r, view)
        amount = None if entries is None else entries.get(self.chain.account)
        if entries is None or not amount:
            return None
        return amount, distribution_proof(entries, self.chain.account, self.chain.leaf_format)

    async def _claim(self, action: Claim, view: dict[str, Any]) -> None:
        r = action.round
        share = await self._my_share(r, view)
        if share is None:
            return
        amount, proof = share
        await self._send({"op": "claim", "round": r, "amount": amount, "proof": proof})
        # included now, or before (already_claimed: a send that timed out here and landed
        # on the chain, read after the view): counted either way, once (the engine plans no
        # claim of a round its record has)
        self._claimed(r, amount)

    async def _count_claim(self, r: int, view: dict[str, Any]) -> None:
        """The chain has this node's claim of round r and its record not (it stopped between
        the two): count it, with its amount from the round's list."""
        share = await self._share(r, view)
        if share is None:  # (logged) as a claim whose list cannot be read: given up
            return
        log.info("task %s: counted this node's claim of round %d (%d), found on the chain",
                 self.name, r, share)
        self._claimed(r, share)

    def _claimed(self, r: int, amount: int) -> None:
        # written at once (not at the step's end), with the round marked claimed in the same
        # write: a restart then counts it once whatever the step does next, and the chain,
        # which has it too, keeps the engine from claiming it again
        self.record.rewarded(amount)
        self.record.done(Claim(r))
        self._save_record()
        self.metrics["claims"] = self.record.claims
        self.metrics["rewards"] = self.record.rewards_claimed
        self.summary.parts.append(f"reward {amount} for round {r}")
        self.last["claim"] = {"round": r, "amount": amount}
        self.rewards.claimed(r, amount)

    async def claim_now(self, r: int) -> int:
        """Claim this node's reward of round r at once (an operator's command, for a round
        the node did not claim by itself); the amount. Refused when there is nothing to."""
        view = await self.chain.round_view(self.task_id, r)
        if not view["paid"]:
            raise Refused("not_ready", f"round {r} is not paid out")
        if self.chain.account in view["claimed"]:
            raise Refused("already_claimed", f"already claimed for round {r}")
        share = await self._my_share(r, view)
        if share is None:
            raise Refused("bad_proof", f"round {r}'s list does not pay this node (or cannot "
                                       "be read from the store)")
        amount, proof = share
        await self.chain.send({"op": "claim", "task_id": self.task_id, "round": r,
                               "amount": amount, "proof": proof})
        self._claimed(r, amount)
        return amount


def _safe(task_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)
