# A whole task network without I/O: every node's round engine (tasks/engine.py) asked each
# slot, its actions turned into transactions applied to one `chain.rules.ChainState`, so the
# rounds, audits, distributions, payouts and claims run end to end in one process.
# Lives here: `simulate` and the simulated nodes' task (a hello-world style proof), used by the
# engine's tests and by the `round_cpu_s_1000` benchmark.
# Must not live here: rules (chain/), engine decisions (engine.py), any clock, network or disk.
#
# Model: chain time advances one slot at a time. In each slot every node that is up reads the
# round views as of the slot's start (a node reads the latest block), plans, and sends its
# transactions, which the chain applies in node order with that slot. Honest nodes compute
# the same distribution list, so its Merkle tree is built once per (round, accepted set) and
# shared: that saves CPU in the simulation without changing any outcome.
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from chain.merkle import distribution_proofs, distribution_root
from chain.rules import (
    Refused,
    apply,
    effective_stake,
    genesis,
    rejected_of,
    round_view,
    task_view,
)

from .api import equal_shares
from .engine import (
    Audit,
    Claim,
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

TASK_ID = "sim"
OWNER = "owner"
GARBAGE = "garbage"


def node_name(i: int) -> str:
    return f"node{i:05d}"


def proof_of(account: str, r: int) -> str:
    """The simulated task's honest submission: what hello-world's cid stands for."""
    return hashlib.sha256(f"Hello, World! from {account} in round {r}".encode()).hexdigest()


@dataclass
class SimNode:
    account: str
    misbehaviour: Misbehaviour | None = None
    record: Record = field(default_factory=Record)
    performed: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    claimed: int = 0


def simulate(
    n_nodes: int,
    rounds: int,
    misbehaving: Mapping[int, Misbehaviour] | Mapping[str, Misbehaviour] | None = None,
    *,
    down: Mapping[int, tuple[int, int]] | Mapping[str, tuple[int, int]] | None = None,
    restart_at: Mapping[int, int] | Mapping[str, int] | None = None,
    round_time: int = 3,
    submission_window: int = 1,
    audit_window: int = 1,
    max_auditors: int = 5,
    allowed_failed_distributions: int = 3,
    share: int = 1_000,
    stake: int = 1_000_000,
    slash_ppm: int = 700_000,
) -> dict[str, Any]:
    """Run `n_nodes` nodes through `rounds` rounds of work and their settlement.

    `misbehaving`: node (index or account) -> Misbehaviour. `down`: node -> [first, last)
    slot range during which it does nothing (it keeps its record). `restart_at`: node -> slot
    at which its record goes through to_dict/from_dict (a restart that loses everything but
    the persisted record). Returns the figures (see the keys at the end)."""

    def key(k: int | str) -> str:
        return node_name(k) if isinstance(k, int) else k

    bad = {key(k): v for k, v in (misbehaving or {}).items()}
    downtime = {key(k): v for k, v in (down or {}).items()}
    restarts = {key(k): v for k, v in (restart_at or {}).items()}
    nodes = [SimNode(node_name(i), bad.get(node_name(i))) for i in range(n_nodes)]
    bounty = share * n_nodes
    state = genesis({OWNER: bounty * rounds + 1, **{n.account: stake for n in nodes}})
    txs: Counter[str] = Counter()
    tx_bytes = 0
    refused: Counter[str] = Counter()
    refused_detail: list[tuple[str, str, str]] = []
    refused_by: dict[str, Counter[str]] = {}

    def send(sender: str, tx: dict[str, Any], slot: int) -> dict[str, Any] | None:
        nonlocal tx_bytes
        tx["nonce"] = state.nonces.get(sender, 0)
        tx_bytes += len(msgpack.packb(tx, use_bin_type=True))
        txs[tx["op"]] += 1
        try:
            return apply(state, sender, tx, slot)
        except Refused as e:
            refused[e.reason] += 1
            refused_by.setdefault(sender, Counter())[e.reason] += 1
            refused_detail.append((sender, tx["op"], f"{e.reason}: {e.detail}"))
            return None

    start_slot = 1
    send(OWNER, {
        "op": "create_task", "task_id": TASK_ID, "name": "hello", "code_hash": bytes(32),
        "round_time": round_time, "submission_window": submission_window,
        "audit_window": audit_window, "min_stake": stake, "bounty_per_round": bounty,
        "start_slot": start_slot, "allowed_failed_distributions": allowed_failed_distributions,
        "slash_ppm": slash_ppm, "max_auditors": max_auditors,
    }, 0)
    send(OWNER, {"op": "fund", "task_id": TASK_ID, "amount": bounty * rounds}, 0)
    for n in nodes:
        send(n.account, {"op": "stake", "task_id": TASK_ID, "amount": stake}, 0)
    supply = state.total_supply()
    cfg = config_of(task_view(state, TASK_ID))

    lists: dict[tuple[int, tuple[str, ...]], tuple[dict[str, int], bytes]] = {}
    proofs: dict[bytes, dict[str, list[bytes]]] = {}
    sent_lists: dict[bytes, dict[str, int]] = {}  # root -> list (the replicated store)
    audits_done: dict[int, dict[str, int]] = {}  # round -> target -> auditors who audited

    # the last list object each round's list was built from: every node of a slot reads the
    # same view, so this skips hashing a tuple of all accepted accounts once per voter
    last_list: dict[int, tuple[list[str], tuple[dict[str, int], bytes]]] = {}

    def honest_list(r: int, accepted: list[str]) -> tuple[dict[str, int], bytes]:
        last = last_list.get(r)
        if last is not None and last[0] is accepted:
            return last[1]
        cache_key = (r, tuple(accepted))
        if cache_key not in lists:
            entries = equal_shares(accepted, bounty)
            lists[cache_key] = (entries, distribution_root(entries))
        last_list[r] = (accepted, lists[cache_key])
        return lists[cache_key]

    last_round = rounds + 2 + allowed_failed_distributions + 2
    end_slot = start_slot + (last_round + 1) * round_time
    slot = start_slot
    for slot in range(start_slot, end_slot):
        task_state = state.tasks[TASK_ID]
        # every node reads the state as of the slot's start
        snapshot_rounds = {r for n in nodes for r in views_needed(cfg, slot, n.record)}
        views = {r: round_view(state, TASK_ID, r, slot) for r in snapshot_rounds}
        for n in nodes:
            if n.account in restarts and restarts[n.account] == slot:
                n.record = Record.from_dict(n.record.to_dict())
            first, last = downtime.get(n.account, (0, 0))
            if first <= slot < last:
                continue
            needed = views_needed(cfg, slot, n.record)
            p = plan(cfg, slot, n.account, n.record, {r: views[r] for r in needed},
                     stake=effective_stake(task_state, n.account, slot),
                     misbehaviour=n.misbehaviour)
            for event in p.events:
                n.record.note(event)
            for action in p.actions:
                if isinstance(action, RunWork) and action.round >= rounds:
                    continue  # the simulated task has `rounds` rounds of work
                _perform(n, action, slot, send, views, honest_list, proofs, sent_lists,
                         audits_done, bounty)
                n.record.done(action)
                n.performed[(type(action).__name__, action.round,
                             getattr(action, "attempt", 0))] += 1
        current = (slot - start_slot) // round_time
        if current > rounds + 1 and all(
                n.record.submitted <= n.record.closed for n in nodes):
            break

    t = state.tasks[TASK_ID]
    coverage = []
    for r, rs in t.rounds.items():
        k = min(max_auditors, max(0, len(rs.submissions) - 1))
        done = audits_done.get(r, {})
        for target in rs.submissions:
            coverage.append(min(done.get(target, 0), k) / k if k else 1.0)
    repeated = sum(c - 1 for n in nodes for c in n.performed.values() if c > 1)
    final_view = task_view(state, TASK_ID, slot)  # once: a view sorts every stake
    return {
        "nodes": n_nodes,
        "rounds": rounds,
        "slots": slot - start_slot + 1,
        "txs": sum(txs.values()),
        "tx_bytes": tx_bytes,
        "txs_by_op": dict(txs),
        "refused": dict(refused),
        "refused_by": {a: dict(c) for a, c in sorted(refused_by.items())},
        "refused_detail": refused_detail[:20],
        "submissions": sum(len(rs.submissions) for rs in t.rounds.values()),
        "rejected": {r: sorted(rejected) for r, rs in sorted(t.rounds.items())
                     if (rejected := rejected_of(t, r, rs))},
        "paid_rounds": sorted(r for r, rs in t.rounds.items() if rs.paid),
        "accepted_attempts": {r: rs.accepted_attempt for r, rs in sorted(t.rounds.items())},
        "audit_coverage": sum(coverage) / len(coverage) if coverage else 1.0,
        "payouts": {n.account: n.claimed for n in nodes},
        "submitted_rounds": {n.account: sorted(r for r, rs in t.rounds.items()
                                               if n.account in rs.submissions) for n in nodes},
        "claimed_rounds": {n.account: sorted(n.record.claimed) for n in nodes},
        "stakes": {n.account: stake_of(final_view, n.account) for n in nodes},
        "slashed_pool": state.slashed_pool,
        "pool": t.pool,
        "supply_conserved": state.total_supply() == supply,
        "repeated_actions": repeated,
        "lookback": lookback(cfg),
    }


def _perform(n: SimNode, action: Any, slot: int, send: Any, views: dict[int, dict[str, Any]],
             honest_list: Any, proofs: dict[bytes, dict[str, list[bytes]]],
             sent_lists: dict[bytes, dict[str, int]], audits_done: dict[int, dict[str, int]],
             bounty: int) -> None:
    """What a node's driver does for one action (the task's code, then the transaction)."""
    me = n.account
    if isinstance(action, RunWork):
        return  # the simulated task's work is its deterministic proof
    r = action.round
    if isinstance(action, Submit):
        submission = GARBAGE if action.garbage else proof_of(me, r)
        send(me, {"op": "submit", "task_id": TASK_ID, "round": r, "submission": submission},
             slot)
    elif isinstance(action, Audit):
        submissions = views[r]["submissions"]
        done = audits_done.setdefault(r, {})
        invalid = []
        for target in action.targets:
            done[target] = done.get(target, 0) + 1
            if action.all_invalid or submissions.get(target) != proof_of(target, r):
                invalid.append(target)
        if invalid:  # all valid: nothing to send
            send(me, {"op": "audit", "task_id": TASK_ID, "round": r, "invalid": invalid}, slot)
    elif isinstance(action, SubmitDistribution):
        entries, root = honest_list(r, views[r]["accepted"])
        if action.inflate:
            entries = inflated(entries, me)
            root = distribution_root(entries)
        sent_lists[root] = entries
        send(me, {"op": "submit_distribution", "task_id": TASK_ID, "round": r, "root": root,
                  "total": sum(entries.values()), "cid": root.hex()}, slot)
    elif isinstance(action, VoteDistribution):
        attempt = next(a for a in views[r]["attempts"] if a["attempt"] == action.attempt)
        _, root = honest_list(r, views[r]["accepted"])
        if attempt["root"] != root:
            send(me, {"op": "audit_distribution", "task_id": TASK_ID, "round": r}, slot)
    elif isinstance(action, Payout):
        send(me, {"op": "payout", "task_id": TASK_ID, "round": r}, slot)
    elif isinstance(action, Claim):
        view = views[r]
        attempt = next(a for a in view["attempts"] if a["attempt"] == view["accepted_attempt"])
        entries = sent_lists[attempt["root"]]
        if me not in entries:
            return  # not listed: nothing to claim
        root = attempt["root"]
        if root not in proofs:
            proofs[root] = distribution_proofs(entries)
        amount = entries[me]
        result = send(me, {"op": "claim", "task_id": TASK_ID, "round": r, "amount": amount,
                           "proof": proofs[root][me]}, slot)
        if result is not None:
            n.claimed += amount
