# The settlement rules of tasknet's task rounds (docs/task-rounds.md is their prose form): the
# chain state (balances, nonces, tasks with stakes, pools and per-round records, the slashed
# pool), its canonical bytes, and `apply`, which checks one signed transaction against the
# state and either refuses it with a named reason, leaving the state untouched, or applies it.
# Every rule is one a contract can check in O(1) or O(k) (docs/evm-settlement.md): this module
# is the reference model of chain/evm/TaskSettlement.sol. Slashing is settled per account, in
# the account's next stake, unstake or submit, all or nothing. Also the read views nodes and
# adapters serve.
# Must not live here: clocks, signatures, storage or networking (the ledger and the adapters
# do those, and hand `apply` the sender and the slot), and any task's own logic.
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from .assignment import (
    AUDIT,
    SUBMISSION,
    audit_end,
    audit_seed,
    auditor_count,
    auditor_order,
    distribution_order,
    ring_auditors,
    ring_targets,
    round_of,
    window_of,
)
from .merkle import EVM_LEAVES, LEDGER_LEAVES, encode_account, verify_claim

# every refusal reason; a contract reverts with its index here (`error Refused(uint8)`)
REASON_CODES: tuple[str, ...] = (
    "bad_nonce",
    "insufficient_balance",
    "unknown_task",
    "task_exists",
    "bad_config",
    "not_staked",
    "outside_window",
    "already_submitted",
    "too_large",
    "not_auditor",
    "already_voted",
    "not_distributor",
    "distribution_exists",
    "no_distribution",
    "over_bounty",
    "not_ready",
    "already_paid",
    "bad_proof",
    "already_claimed",
    "slashed",
    "stake_locked",
    "bad_amount",
    "malformed",
)
REASONS = frozenset(REASON_CODES)

MAX_UINT64 = 2**64 - 1
MAX_ROUND = 2**63 - 1
PPM = 1_000_000
MAX_ACCOUNT_BYTES = 128
MAX_TASK_ID_BYTES = 64
MAX_NAME_BYTES = 128
MAX_SUBMISSION_BYTES = 512
MAX_CID_BYTES = 256
MAX_PROOF_LENGTH = 64
MAX_AUDITORS_LIMIT = 64
MAX_FAILED_DISTRIBUTIONS_LIMIT = 64
HASH_BYTES = 32
STATE_FORMAT = 2
LEAF_FORMATS = frozenset({LEDGER_LEAVES, EVM_LEAVES})


class Refused(Exception):
    """A transaction the rules refuse; `reason` is one of REASONS, `detail` human text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- field checks: every one raises Refused ---


def _utf8_size(value: str) -> int | None:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _is_uint(value: object, limit: int = MAX_UINT64) -> bool:
    return type(value) is int and 0 <= value <= limit


def _check_str(value: object, what: str, max_bytes: int, reason: str, min_bytes: int = 0) -> str:
    if type(value) is not str:
        raise Refused(reason if reason == "bad_config" else "malformed", f"{what} must be a str")
    size = _utf8_size(value)
    if size is None:
        raise Refused(reason if reason == "bad_config" else "malformed", f"{what} is not UTF-8")
    if size < min_bytes or size > max_bytes:
        raise Refused(reason, f"{what} must be {min_bytes}..{max_bytes} bytes UTF-8, got {size}")
    return value


def _check_account(value: object, what: str) -> str:
    return _check_str(value, what, MAX_ACCOUNT_BYTES, "malformed", min_bytes=1)


def _check_uint(value: object, what: str, limit: int = MAX_UINT64) -> int:
    if not _is_uint(value, limit):
        raise Refused("malformed", f"{what} must be an int in [0, {limit}], got {value!r}")
    assert isinstance(value, int)
    return value


def check_amount(value: object, what: str = "amount") -> int:
    """A positive amount: a non-int is malformed, zero, negative or too large a bad_amount."""
    if type(value) is not int:
        raise Refused("malformed", f"{what} must be an int, got {type(value).__name__}")
    if not 0 < value <= MAX_UINT64:
        raise Refused("bad_amount", f"{what} must be in [1, 2**64), got {value}")
    return value


def _check_hash(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != HASH_BYTES:
        raise Refused("malformed", f"{what} must be {HASH_BYTES} bytes")
    return value


# --- state ---


@dataclass(frozen=True)
class TaskConfig:
    """A task's fixed parameters (the fields of create_task), validated on construction."""

    task_id: str
    name: str
    code_hash: bytes
    round_time: int
    submission_window: int
    audit_window: int
    min_stake: int
    bounty_per_round: int
    start_slot: int
    allowed_failed_distributions: int = 3
    slash_ppm: int = 700_000
    unstake_delay_rounds: int = 2
    max_auditors: int = 5

    def __post_init__(self) -> None:
        _check_str(self.task_id, "task_id", MAX_TASK_ID_BYTES, "bad_config", min_bytes=1)
        _check_str(self.name, "name", MAX_NAME_BYTES, "bad_config")
        if type(self.code_hash) is not bytes or len(self.code_hash) != HASH_BYTES:
            raise Refused("bad_config", f"code_hash must be {HASH_BYTES} bytes")
        limits = {
            "round_time": (1, MAX_UINT64),
            "submission_window": (1, MAX_UINT64),
            "audit_window": (1, MAX_UINT64),
            "min_stake": (1, MAX_UINT64),
            "bounty_per_round": (0, MAX_UINT64),
            "start_slot": (0, MAX_UINT64),
            "allowed_failed_distributions": (0, MAX_FAILED_DISTRIBUTIONS_LIMIT),
            "slash_ppm": (0, PPM),
            "unstake_delay_rounds": (0, MAX_UINT64),
            "max_auditors": (1, MAX_AUDITORS_LIMIT),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise Refused("bad_config", f"{name} must be an int in [{low}, {high}]")
        if self.submission_window + self.audit_window > self.round_time:
            raise Refused("bad_config", "submission_window + audit_window > round_time")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


CONFIG_FIELDS = tuple(f.name for f in fields(TaskConfig))
CONFIG_OPTIONAL = frozenset(
    {"start_slot", "allowed_failed_distributions", "slash_ppm", "unstake_delay_rounds"}
    | {"max_auditors"}
)


@dataclass
class Attempt:
    """One distribution list submitted for a round (attempt j is sent in round r+2+j)."""

    distributor: str
    root: bytes
    total: int
    cid: str
    slot: int
    votes_against: set[str] = field(default_factory=set)


@dataclass
class Ring:
    """The auditor ring and distribution order of a round, computed from its submissions
    (cached, never stored)."""

    size: int
    seed: bytes
    order: list[str]
    position: dict[str, int]
    k: int
    distributors: list[str]
    key: bytes  # names this ring: its seed and its submitters in index order


    def auditors(self, target: str) -> list[str]:
        at = self.position.get(target)
        return [] if at is None else ring_auditors(self.order, at, self.k)

    def targets(self, auditor: str) -> list[str]:
        at = self.position.get(auditor)
        return [] if at is None else ring_targets(self.order, at, self.k)


@dataclass
class RoundState:
    """What the chain holds for the work of round r of a task. `submissions` keeps the order
    the submissions were included in: a submitter's index is its place in it."""

    submissions: dict[str, str] = field(default_factory=dict)
    votes: dict[str, set[str]] = field(default_factory=dict)  # target -> auditors against it
    auditors_voted: set[str] = field(default_factory=set)
    slashed: dict[str, int] = field(default_factory=dict)  # account -> cut, once settled
    attempts: dict[int, Attempt] = field(default_factory=dict)
    accepted_attempt: int | None = None
    paid: bool = False
    claimable: int = 0
    claimed: set[str] = field(default_factory=set)
    ring_cache: Ring | None = field(default=None, compare=False, repr=False)


@dataclass
class TaskState:
    config: TaskConfig
    owner: str
    pool: int = 0
    stakes: dict[str, int] = field(default_factory=dict)
    last_submission_round: dict[str, int] = field(default_factory=dict)  # round r+1 of work r
    pending: dict[str, int] = field(default_factory=dict)  # account -> round not yet settled
    rounds: dict[int, RoundState] = field(default_factory=dict)


@dataclass
class ChainState:
    balances: dict[str, int] = field(default_factory=dict)
    nonces: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    slashed_pool: int = 0
    leaf_format: str = LEDGER_LEAVES  # how distribution lists hash their entries

    def total_supply(self) -> int:
        """Every token, wherever it is: balances, stakes, pools, claimable funds, slashed."""
        total = sum(self.balances.values()) + self.slashed_pool
        for task in self.tasks.values():
            total += task.pool + sum(task.stakes.values())
            total += sum(rs.claimable for rs in task.rounds.values())
        return total

    def to_bytes(self) -> bytes:
        return msgpack.packb(_state_doc(self), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> ChainState:
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
            return _state_from_doc(doc)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, Refused) as exc:
            raise ValueError(f"not a chain state snapshot: {exc}") from exc

    def copy(self) -> ChainState:
        return ChainState.from_bytes(self.to_bytes())


def genesis(balances: Mapping[str, int], *, leaf_format: str = LEDGER_LEAVES) -> ChainState:
    """The state at genesis: these free balances and nothing else. ValueError on bad input."""
    if leaf_format not in LEAF_FORMATS:
        raise ValueError(f"unknown leaf format {leaf_format!r}")
    clean: dict[str, int] = {}
    for account, amount in sorted(balances.items()):
        try:
            _check_account(account, "account")
        except Refused as exc:
            raise ValueError(exc.detail) from None
        if not _is_uint(amount):
            raise ValueError(f"balance of {account!r} must be an int in [0, 2**64)")
        if amount:
            clean[account] = amount
    if sum(clean.values()) > MAX_UINT64:
        raise ValueError("total supply must be below 2**64")
    return ChainState(balances=clean, leaf_format=leaf_format)


# --- canonical encoding ---


def _sorted_map(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    return {key: mapping[key] for key in sorted(mapping)}


def _round_doc(r: int, rs: RoundState) -> list[Any]:
    attempts = [
        [j, a.distributor, a.root, a.total, a.cid, a.slot, sorted(a.votes_against)]
        for j, a in sorted(rs.attempts.items())
    ]
    return [
        r,
        [[account, text] for account, text in rs.submissions.items()],  # inclusion order
        {target: sorted(rs.votes[target]) for target in sorted(rs.votes)},
        sorted(rs.auditors_voted),
        _sorted_map(rs.slashed),
        attempts,
        rs.accepted_attempt,
        rs.paid,
        rs.claimable,
        sorted(rs.claimed),
    ]


def _task_doc(task: TaskState) -> list[Any]:
    cfg = task.config
    return [
        [getattr(cfg, name) for name in CONFIG_FIELDS],
        task.owner,
        task.pool,
        _sorted_map(task.stakes),
        _sorted_map(task.last_submission_round),
        _sorted_map(task.pending),
        [_round_doc(r, rs) for r, rs in sorted(task.rounds.items())],
    ]


def _state_doc(state: ChainState) -> list[Any]:
    return [
        STATE_FORMAT,
        state.leaf_format,
        _sorted_map(state.balances),
        _sorted_map(state.nonces),
        state.slashed_pool,
        [_task_doc(state.tasks[task_id]) for task_id in sorted(state.tasks)],
    ]


def _int_map(doc: Any) -> dict[str, int]:
    if not isinstance(doc, dict) or not all(
        type(k) is str and type(v) is int for k, v in doc.items()
    ):
        raise ValueError("expected a str -> int map")
    return dict(doc)


def _str_set(doc: Any) -> set[str]:
    if not isinstance(doc, list) or not all(type(x) is str for x in doc):
        raise ValueError("expected a list of str")
    return set(doc)


def _round_from_doc(doc: list[Any]) -> tuple[int, RoundState]:
    (r, submissions, votes, voted, slashed, attempts, accepted, paid, claimable,
     claimed) = doc  # fmt: skip
    if not isinstance(submissions, list) or not isinstance(votes, dict):
        raise ValueError("bad round record")
    rs = RoundState(
        submissions={str(account): str(text) for account, text in submissions},
        votes={target: _str_set(voters) for target, voters in votes.items()},
        auditors_voted=_str_set(voted),
        slashed=_int_map(slashed),
        attempts={},
        accepted_attempt=accepted,
        paid=bool(paid),
        claimable=int(claimable),
        claimed=_str_set(claimed),
    )
    for j, distributor, root, total, cid, slot, against in attempts:
        rs.attempts[int(j)] = Attempt(distributor, bytes(root), total, cid, slot, _str_set(against))
    return int(r), rs


def _state_from_doc(doc: list[Any]) -> ChainState:
    version = doc[0] if isinstance(doc, list) and doc else None
    if version != STATE_FORMAT:
        raise ValueError(f"state format {version!r}, this tasknet reads format {STATE_FORMAT}")
    _, leaf_format, balances, nonces, slashed_pool, tasks = doc
    if leaf_format not in LEAF_FORMATS:
        raise ValueError(f"unknown leaf format {leaf_format!r}")
    state = ChainState(_int_map(balances), _int_map(nonces), {}, int(slashed_pool), leaf_format)
    for config_doc, owner, pool, stakes, last, pending, rounds in tasks:
        cfg = TaskConfig(**dict(zip(CONFIG_FIELDS, config_doc, strict=True)))
        task = TaskState(cfg, owner, int(pool), _int_map(stakes), _int_map(last),
                         _int_map(pending), {})
        for round_doc in rounds:
            r, rs = _round_from_doc(round_doc)
            task.rounds[r] = rs
        state.tasks[cfg.task_id] = task
    return state


# --- derived facts about a round ---


def ring_of(task: TaskState, r: int, rs: RoundState) -> Ring:
    """The auditor ring of round r from its current submissions (fixed once the submission
    window is over), cached on the round record."""
    cached = rs.ring_cache
    if cached is not None and cached.size == len(rs.submissions):
        return cached
    seed = audit_seed(task.config.task_id, r, rs.submissions.values())
    accounts = list(rs.submissions)
    order = auditor_order(seed, accounts)
    ring = Ring(
        size=len(accounts),
        seed=seed,
        order=order,
        position={account: i for i, account in enumerate(order)},
        k=auditor_count(len(order), task.config.max_auditors),
        distributors=distribution_order(seed, accounts),
        key=hashlib.sha256(seed + b"".join(encode_account(a) for a in accounts)).digest(),
    )
    rs.ring_cache = ring
    return ring


def rejected_of(task: TaskState, r: int, rs: RoundState) -> set[str]:
    """The submitters of round r that more than half of their k auditors voted against
    (final once round r+1's audit window is over)."""
    k = ring_of(task, r, rs).k
    return {target for target, voters in rs.votes.items() if 2 * len(voters) > k}


@dataclass
class Settlement:
    """The settlement of an account's pending round: whether it was rejected, and its cut."""

    account: str
    r: int
    rejected: bool
    cut: int


def _settlement_of(task: TaskState, account: str, slot: int) -> Settlement | None:
    """The settlement due for `account` at `slot`: None while it has no pending round or the
    pending round's audits are not over."""
    r = task.pending.get(account)
    if r is None or slot < audit_end(task.config, r + 1):
        return None
    rs = task.rounds[r]
    rejected = account in rs.votes and account in rejected_of(task, r, rs)
    cut = task.stakes.get(account, 0) * task.config.slash_ppm // PPM if rejected else 0
    return Settlement(account, r, rejected, cut)


def _commit_settlement(
    state: ChainState, task: TaskState, plan: Settlement | None
) -> dict[str, Any]:
    if plan is None:
        return {}
    del task.pending[plan.account]
    if not plan.rejected:
        return {"settled": plan.r}
    _set_amount(task.stakes, plan.account, task.stakes.get(plan.account, 0) - plan.cut)
    state.slashed_pool += plan.cut
    task.rounds[plan.r].slashed[plan.account] = plan.cut
    return {"settled": plan.r, "slashed": plan.cut}


def _set_amount(mapping: dict[str, int], account: str, amount: int) -> None:
    if amount:
        mapping[account] = amount
    else:
        mapping.pop(account, None)


def _distribution_status(
    task: TaskState, r: int, rs: RoundState, slot: int, rejected: set[str]
) -> tuple[str, int | None]:
    """("accepted", j) once attempt j's audit window is over without a majority against it;
    ("pending", j) while the latest attempt j is undecided; ("none", None) otherwise."""
    voters = len(rs.submissions) - len(rejected) - 1
    for j, attempt in sorted(rs.attempts.items()):
        if slot < audit_end(task.config, r + 2 + j):
            return "pending", j
        if not 2 * len(attempt.votes_against) > voters:
            return "accepted", j
    return "none", None


# --- transactions: each handler checks everything and returns the commit that applies it ---

Commit = Callable[[], dict[str, Any]]
Handler = Callable[[ChainState, str, dict[str, Any], int], Commit]


def _task(state: ChainState, tx: Mapping[str, Any]) -> TaskState:
    task_id = _check_str(tx["task_id"], "task_id", MAX_TASK_ID_BYTES, "malformed", min_bytes=1)
    task = state.tasks.get(task_id)
    if task is None:
        raise Refused("unknown_task", f"no task {task_id!r}")
    return task


def _round_field(tx: Mapping[str, Any]) -> int:
    return _check_uint(tx["round"], "round", MAX_ROUND - 2 - MAX_FAILED_DISTRIBUTIONS_LIMIT)


def _debit(state: ChainState, sender: str, amount: int) -> None:
    have = state.balances.get(sender, 0)
    if have < amount:
        raise Refused("insufficient_balance", f"balance {have} < {amount}")


def _transfer(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    to = _check_account(tx["to"], "to")
    amount = check_amount(tx["amount"])
    _debit(state, sender, amount)

    def commit() -> dict[str, Any]:
        _set_amount(state.balances, sender, state.balances[sender] - amount)
        state.balances[to] = state.balances.get(to, 0) + amount
        return {"amount": amount}

    return commit


def _create_task(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    values = {name: tx[name] for name in CONFIG_FIELDS if name in tx}
    values.setdefault("start_slot", slot)
    cfg = TaskConfig(**values)
    if cfg.task_id in state.tasks:
        raise Refused("task_exists", f"task {cfg.task_id!r} exists")

    def commit() -> dict[str, Any]:
        state.tasks[cfg.task_id] = TaskState(config=cfg, owner=sender)
        return {"task_id": cfg.task_id, "start_slot": cfg.start_slot}

    return commit


def _fund(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    amount = check_amount(tx["amount"])
    _debit(state, sender, amount)

    def commit() -> dict[str, Any]:
        _set_amount(state.balances, sender, state.balances[sender] - amount)
        task.pool += amount
        return {"amount": amount, "pool": task.pool}

    return commit


def _stake(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    amount = check_amount(tx["amount"])
    _debit(state, sender, amount)
    plan = _settlement_of(task, sender, slot)

    def commit() -> dict[str, Any]:
        settled = _commit_settlement(state, task, plan)
        _set_amount(state.balances, sender, state.balances[sender] - amount)
        task.stakes[sender] = task.stakes.get(sender, 0) + amount
        return {"amount": amount, "stake": task.stakes[sender], **settled}

    return commit


def _unstake(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    cfg = task.config
    amount = check_amount(tx["amount"])
    last = task.last_submission_round.get(sender)
    current = round_of(cfg, slot)
    if last is not None and (current is None or current < last + cfg.unstake_delay_rounds):
        raise Refused(
            "stake_locked",
            f"last submission in round {last}: unstake from round "
            f"{last + cfg.unstake_delay_rounds}",
        )
    pending = task.pending.get(sender)
    if pending is not None and slot < audit_end(cfg, pending + 1):
        raise Refused("stake_locked", f"the audits of round {pending} are not over")
    plan = _settlement_of(task, sender, slot)
    stake = task.stakes.get(sender, 0) - (plan.cut if plan is not None else 0)
    if amount > stake:
        raise Refused("insufficient_balance", f"stake {stake} < {amount}")

    def commit() -> dict[str, Any]:
        settled = _commit_settlement(state, task, plan)
        _set_amount(task.stakes, sender, task.stakes.get(sender, 0) - amount)
        state.balances[sender] = state.balances.get(sender, 0) + amount
        return {"amount": amount, **settled}

    return commit


def _submit(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    cfg = task.config
    r = _round_field(tx)
    submission = _check_str(tx["submission"], "submission", MAX_SUBMISSION_BYTES, "too_large")
    current, window = window_of(cfg, slot)
    if current != r + 1 or window != SUBMISSION:
        raise Refused(
            "outside_window",
            f"work of round {r} is submitted in round {r + 1}'s submission window, "
            f"now round {current} {window}",
        )
    plan = _settlement_of(task, sender, slot)  # the pending round is older: its audits are over
    stake = task.stakes.get(sender, 0) - (plan.cut if plan is not None else 0)
    if stake < cfg.min_stake:
        raise Refused("not_staked", f"stake {stake} < min_stake {cfg.min_stake}")
    record = task.rounds.get(r)
    if record is not None and sender in record.submissions:
        raise Refused("already_submitted", f"already submitted for round {r}")

    def commit() -> dict[str, Any]:
        settled = _commit_settlement(state, task, plan)
        rs = task.rounds.get(r)
        if rs is None:
            rs = task.rounds[r] = RoundState()
        rs.submissions[sender] = submission
        task.pending[sender] = r
        task.last_submission_round[sender] = max(task.last_submission_round.get(sender, 0), r + 1)
        return {"round": r, "index": len(rs.submissions) - 1, **settled}

    return commit


def _audit(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    cfg = task.config
    r = _round_field(tx)
    invalid = tx["invalid"]
    if not isinstance(invalid, list | tuple) or len(invalid) > cfg.max_auditors:
        raise Refused("malformed", f"invalid must be a list of at most {cfg.max_auditors}")
    targets = [_check_account(target, "invalid target") for target in invalid]
    if len(set(targets)) != len(targets):
        raise Refused("malformed", "invalid lists an account twice")
    current, window = window_of(cfg, slot)
    if current != r + 1 or window != AUDIT:
        raise Refused(
            "outside_window",
            f"round {r} is audited in round {r + 1}'s audit window, now round {current} {window}",
        )
    rs = task.rounds.get(r)
    if rs is None or sender not in rs.submissions:
        raise Refused("not_auditor", f"did not submit for round {r}")
    if sender in rs.auditors_voted:
        raise Refused("already_voted", f"already audited round {r}")
    assigned = set(ring_of(task, r, rs).targets(sender))
    for target in targets:
        if target not in assigned:
            raise Refused("not_auditor", f"not assigned to audit {target!r}")

    def commit() -> dict[str, Any]:
        rs.auditors_voted.add(sender)
        for target in targets:
            rs.votes.setdefault(target, set()).add(sender)
        return {"round": r, "invalid": len(targets)}

    return commit


def _current_attempt(task: TaskState, r: int, slot: int, window: str) -> int:
    cfg = task.config
    current, now_window = window_of(cfg, slot)
    attempt = current - (r + 2)
    if now_window != window or not 0 <= attempt <= cfg.allowed_failed_distributions:
        raise Refused(
            "outside_window",
            f"distributions of round {r} are in the {window} windows of rounds {r + 2}.."
            f"{r + 2 + cfg.allowed_failed_distributions}, now round {current} {now_window}",
        )
    return attempt


def _submit_distribution(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    cfg = task.config
    r = _round_field(tx)
    root = _check_hash(tx["root"], "root")
    total = _check_uint(tx["total"], "total")
    cid = _check_str(tx["cid"], "cid", MAX_CID_BYTES, "too_large")
    attempt = _current_attempt(task, r, slot, SUBMISSION)
    rs = task.rounds.get(r)
    if rs is None or not rs.submissions:
        raise Refused("not_distributor", f"nobody submitted for round {r}")
    if attempt in rs.attempts:
        raise Refused("distribution_exists", f"attempt {attempt} of round {r} was sent")
    rejected = rejected_of(task, r, rs)
    status, accepted_attempt = _distribution_status(task, r, rs, slot, rejected)
    if status == "accepted":
        raise Refused("distribution_exists", f"attempt {accepted_attempt} was accepted")
    order = ring_of(task, r, rs).distributors
    distributor = order[attempt % len(order)]
    if sender != distributor:
        raise Refused("not_distributor", f"attempt {attempt} is {distributor!r}'s")
    if sender in rejected:
        raise Refused("slashed", f"submission for round {r} was rejected")
    if total > cfg.bounty_per_round:
        raise Refused("over_bounty", f"total {total} > bounty_per_round {cfg.bounty_per_round}")
    if total > task.pool:
        raise Refused("insufficient_balance", f"total {total} > pool {task.pool}")

    def commit() -> dict[str, Any]:
        rs.attempts[attempt] = Attempt(sender, root, total, cid, slot)
        return {"round": r, "attempt": attempt}

    return commit


def _audit_distribution(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    r = _round_field(tx)
    attempt_no = _current_attempt(task, r, slot, AUDIT)
    rs = task.rounds.get(r)
    attempt = None if rs is None else rs.attempts.get(attempt_no)
    if rs is None or attempt is None:
        raise Refused("no_distribution", f"no attempt {attempt_no} for round {r}")
    if sender not in rs.submissions:
        raise Refused("not_auditor", f"did not submit for round {r}")
    if sender in rejected_of(task, r, rs):
        raise Refused("slashed", f"submission for round {r} was rejected")
    if sender == attempt.distributor:
        raise Refused("not_auditor", "the distributor does not vote on its own list")
    if sender in attempt.votes_against:
        raise Refused("already_voted", f"already voted on attempt {attempt_no}")

    def commit() -> dict[str, Any]:
        attempt.votes_against.add(sender)
        return {"round": r, "attempt": attempt_no, "votes_against": len(attempt.votes_against)}

    return commit


def _payout(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    task = _task(state, tx)
    r = _round_field(tx)
    rs = task.rounds.get(r)
    if rs is None or not rs.submissions:
        raise Refused("no_distribution", f"nobody submitted for round {r}")
    if rs.paid:
        raise Refused("already_paid", f"round {r} was paid out")
    status, attempt_no = _distribution_status(task, r, rs, slot, rejected_of(task, r, rs))
    if status == "pending":
        raise Refused("not_ready", f"attempt {attempt_no} of round {r} is still being audited")
    if status == "none" or attempt_no is None:
        raise Refused("no_distribution", f"no accepted distribution for round {r}")
    total = rs.attempts[attempt_no].total
    if total > task.pool:
        raise Refused("insufficient_balance", f"total {total} > pool {task.pool}")
    accepted_no = attempt_no

    def commit() -> dict[str, Any]:
        task.pool -= total
        rs.claimable = total
        rs.paid = True
        rs.accepted_attempt = accepted_no
        return {"round": r, "attempt": accepted_no, "total": total}

    return commit


def _claim(
    state: ChainState, sender: str, tx: dict[str, Any], slot: int, check_proof: bool = True
) -> Commit:
    task = _task(state, tx)
    r = _round_field(tx)
    amount = check_amount(tx["amount"])
    proof = tx["proof"]
    if not isinstance(proof, list | tuple) or len(proof) > MAX_PROOF_LENGTH:
        raise Refused("malformed", f"proof must be a list of at most {MAX_PROOF_LENGTH} hashes")
    hashes = [_check_hash(node, "proof entry") for node in proof]
    rs = task.rounds.get(r)
    if rs is None or not rs.submissions:
        raise Refused("no_distribution", f"nobody submitted for round {r}")
    if not rs.paid or rs.accepted_attempt is None:
        raise Refused("not_ready", f"round {r} is not paid out")
    if sender not in rs.submissions:
        raise Refused("bad_proof", f"did not submit for round {r}")
    if sender in rejected_of(task, r, rs):
        raise Refused("slashed", f"submission for round {r} was rejected")
    if sender in rs.claimed:
        raise Refused("already_claimed", f"already claimed for round {r}")
    root = rs.attempts[rs.accepted_attempt].root
    if check_proof and not verify_claim(state.leaf_format, sender, amount, hashes, root):
        raise Refused("bad_proof", f"({sender!r}, {amount}) is not in the list of round {r}")
    if amount > rs.claimable:
        raise Refused("over_bounty", f"amount {amount} > claimable {rs.claimable}")

    def commit() -> dict[str, Any]:
        rs.claimable -= amount
        rs.claimed.add(sender)
        state.balances[sender] = state.balances.get(sender, 0) + amount
        return {"round": r, "amount": amount}

    return commit


def _claim_proof_checked(state: ChainState, sender: str, tx: dict[str, Any], slot: int) -> Commit:
    return _claim(state, sender, tx, slot, check_proof=False)


# op -> (handler, required fields, optional fields)
OPS: dict[str, tuple[Handler, frozenset[str], frozenset[str]]] = {
    "transfer": (_transfer, frozenset({"to", "amount"}), frozenset()),
    "create_task": (
        _create_task,
        frozenset(CONFIG_FIELDS) - CONFIG_OPTIONAL,
        CONFIG_OPTIONAL,
    ),
    "fund": (_fund, frozenset({"task_id", "amount"}), frozenset()),
    "stake": (_stake, frozenset({"task_id", "amount"}), frozenset()),
    "unstake": (_unstake, frozenset({"task_id", "amount"}), frozenset()),
    "submit": (_submit, frozenset({"task_id", "round", "submission"}), frozenset()),
    "audit": (_audit, frozenset({"task_id", "round", "invalid"}), frozenset()),
    "submit_distribution": (
        _submit_distribution,
        frozenset({"task_id", "round", "root", "total", "cid"}),
        frozenset(),
    ),
    "audit_distribution": (_audit_distribution, frozenset({"task_id", "round"}), frozenset()),
    "payout": (_payout, frozenset({"task_id", "round"}), frozenset()),
    "claim": (_claim, frozenset({"task_id", "round", "amount", "proof"}), frozenset()),
}
ENVELOPE_FIELDS = frozenset({"op", "nonce"})


def apply(
    state: ChainState, sender: str, tx: dict[str, Any], slot: int, *, proof_checked: bool = False
) -> dict[str, Any]:
    """Apply one transaction of `sender` at chain time `slot`. Returns {"ok": True, "op": ...,
    ...what it did}; raises Refused (state untouched, nonce not consumed) otherwise. A bad
    `slot` is the caller's bug: ValueError. `proof_checked`: a claim's Merkle proof was checked
    by the chain that included it (a replica replaying a contract's events, which carry no
    proofs); every other check still applies."""
    if not _is_uint(slot):
        raise ValueError(f"slot must be an int in [0, 2**64), got {slot!r}")
    _check_account(sender, "sender")
    if not isinstance(tx, dict):
        raise Refused("malformed", "a transaction is a dict")
    op = tx.get("op")
    spec = OPS.get(op) if type(op) is str else None
    if spec is None:
        raise Refused("malformed", f"unknown op {op!r}")
    handler, required, optional = spec
    keys = set(tx)
    missing = (required | {"nonce"}) - keys
    if missing:
        raise Refused("malformed", f"{op} lacks {sorted(missing)}")
    extra = keys - required - optional - ENVELOPE_FIELDS
    if extra:
        raise Refused("malformed", f"{op} has unknown fields {sorted(map(str, extra))}")
    nonce = _check_uint(tx["nonce"], "nonce")
    expected = state.nonces.get(sender, 0)
    if nonce != expected:
        raise Refused("bad_nonce", f"nonce {nonce}, expected {expected}")
    if proof_checked and op == "claim":
        handler = _claim_proof_checked
    commit = handler(state, sender, tx, slot)
    result = commit()
    state.nonces[sender] = nonce + 1
    return {"ok": True, "op": op, **result}


# --- views: plain msgpack-able data ---


def _task_or_refuse(state: ChainState, task_id: str) -> TaskState:
    task = state.tasks.get(task_id)
    if task is None:
        raise Refused("unknown_task", f"no task {task_id!r}")
    return task


def effective_stake(task: TaskState, account: str, slot: int) -> int:
    """`account`'s stake as it would be after settling what is due at `slot` (a rejected
    submission's cut is taken when the account next acts, but it is already lost)."""
    plan = _settlement_of(task, account, slot)
    return task.stakes.get(account, 0) - (plan.cut if plan is not None else 0)


def task_view(state: ChainState, task_id: str, slot: int | None = None) -> dict[str, Any]:
    """The task. With `slot`, "stakes" are effective stakes at that slot (cuts due deducted);
    without, the stakes the chain has recorded."""
    task = _task_or_refuse(state, task_id)
    if slot is None:
        stakes = _sorted_map(task.stakes)
    else:
        stakes = {account: effective_stake(task, account, slot) for account in sorted(task.stakes)}
    return {
        "task_id": task_id,
        "config": task.config.to_dict(),
        "owner": task.owner,
        "pool": task.pool,
        "stakes": stakes,
        "last_submission_round": _sorted_map(task.last_submission_round),
        "rounds": sorted(task.rounds),
        "pending": _sorted_map(task.pending),
        "unpaid_rounds": sorted(r for r, rs in task.rounds.items() if not rs.paid),
    }


def account_view(state: ChainState, account: str) -> dict[str, Any]:
    return {
        "account": account,
        "balance": state.balances.get(account, 0),
        "nonce": state.nonces.get(account, 0),
        "stakes": {
            task_id: state.tasks[task_id].stakes[account]
            for task_id in sorted(state.tasks)
            if account in state.tasks[task_id].stakes
        },
    }


def round_view(state: ChainState, task_id: str, r: int, slot: int | None = None) -> dict[str, Any]:
    """Everything about the work of round r. With `slot`, results not yet settled on chain
    (rejections, slashes, which attempt is accepted) are given as they would be settled at
    that slot; without, only what the chain has recorded (None where unknown)."""
    task = _task_or_refuse(state, task_id)
    cfg = task.config
    _check_uint(r, "round", MAX_ROUND)
    rs = task.rounds.get(r)
    if rs is None:
        rs = RoundState()  # a view of a round nobody submitted for: not stored
    ring = ring_of(task, r, rs)
    final = slot is not None and slot >= audit_end(cfg, r + 1)
    rejected: set[str] | None = rejected_of(task, r, rs) if final else None
    slashed: dict[str, int] | None = None
    if rejected is not None:  # cuts taken, or to be taken from the stake as it is now
        ppm = cfg.slash_ppm
        slashed = {account: rs.slashed.get(account, task.stakes.get(account, 0) * ppm // PPM)
                   for account in rejected}
    accepted = None if rejected is None else sorted(set(rs.submissions) - rejected)
    distributors = ring.distributors if rejected is not None else []
    voters = None if accepted is None else max(0, len(accepted) - 1)

    accepted_attempt = rs.accepted_attempt
    status_now: tuple[str, int | None] = ("none", None)
    if slot is not None and rejected is not None:
        status_now = _distribution_status(task, r, rs, slot, rejected)
        if status_now[0] == "accepted":
            accepted_attempt = status_now[1]
    attempts = []
    for j, attempt in sorted(rs.attempts.items()):
        if accepted_attempt == j:
            status = "accepted"
        elif (
            voters is not None
            and 2 * len(attempt.votes_against) > voters
            and (slot is not None and slot >= audit_end(cfg, r + 2 + j))
        ):
            status = "rejected"
        else:
            status = "open"
        attempts.append(
            {
                "attempt": j,
                "distributor": attempt.distributor,
                "root": attempt.root,
                "total": attempt.total,
                "cid": attempt.cid,
                "slot": attempt.slot,
                "votes_against": sorted(attempt.votes_against),
                "status": status,
            }
        )
    current_attempt: int | None = None
    current_distributor: str | None = None
    if slot is not None and accepted_attempt is None:
        now = round_of(cfg, slot)
        turn = None if now is None else now - (r + 2)
        if turn is not None and 0 <= turn <= cfg.allowed_failed_distributions:
            current_attempt = turn
            if distributors:
                current_distributor = distributors[turn % len(distributors)]
    return {
        "task_id": task_id,
        "round": r,
        "submissions": _sorted_map(rs.submissions),
        "submitters": list(rs.submissions),  # in inclusion order: a submitter's index
        "seed": ring.seed,
        "ring_key": ring.key,  # the seed names the texts submitted; this, the submitters too
        "k": ring.k,
        "auditors": {target: ring.auditors(target) for target in sorted(rs.submissions)},
        "votes": {target: sorted(rs.votes[target]) for target in sorted(rs.votes)},
        "audited": sorted(rs.auditors_voted),
        "settled": final,
        "rejected": None if rejected is None else sorted(rejected),
        "slashed": None if slashed is None else _sorted_map(slashed),
        "accepted": accepted,
        "distributors": distributors,
        "attempts": attempts,
        "current_attempt": current_attempt,
        "current_distributor": current_distributor,
        "accepted_attempt": accepted_attempt,
        "paid": rs.paid,
        "claimable": rs.claimable,
        "claimed": sorted(rs.claimed),
    }
