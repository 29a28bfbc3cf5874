# The chain adapter for the TaskSettlement contract on an EVM chain: transactions become
# contract calls signed by the node's wallet; reads come from a replica of the settlement state
# that the adapter keeps by replaying the contract's events, in chain order, through
# `chain.rules.apply` (the contract and the rules are one set of rules: docs/evm-settlement.md),
# so round views are the same on every chain. Balances come from the chain itself (gwei).
# Lives here: the op -> call mapping, the event -> transaction mapping, the replica and its
# catch-up, the peer bindings (which node stands behind an account), opening and checking a
# contract. Must not live here: JSON-RPC and signing (client.py), the rules (chain/rules.py),
# any round logic (tasks/).
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from eth_utils import keccak
from libp2p.peer.id import ID

from p2p.identity import Identity

from .. import rules
from ..adapter import ChainAdapter, ChainError, ChainUnavailable, Receipt
from ..merkle import EVM_LEAVES
from ..rules import ChainState, Refused
from .client import EvmClient, TxReceipt, TxUnconfirmed
from .wallet import EvmWallet, sign_binding, verify_binding

log = logging.getLogger(__name__)

ARTIFACT_PATH = Path(__file__).with_name("TaskSettlement.json")
GWEI = 10**9
SLOT_MS = 1000  # a slot is a second: the block timestamp
LOG_CHUNK_BLOCKS = 2_000  # blocks per eth_getLogs request while catching up
T = TypeVar("T")


def load_artifact() -> dict[str, Any]:
    """The committed ABI and bytecode of TaskSettlement (no compiler needed to run a node)."""
    artifact: dict[str, Any] = json.loads(ARTIFACT_PATH.read_text())
    return artifact


def settlement_id() -> bytes:
    return bytes(keccak(b"tasknet.TaskSettlement.v1"))


CONFIG_ORDER = (
    "round_time",
    "submission_window",
    "audit_window",
    "min_stake",
    "bounty_per_round",
    "start_slot",
    "allowed_failed_distributions",
    "slash_ppm",
    "unstake_delay_rounds",
    "max_auditors",
    "code_hash",
)
CONFIG_DEFAULTS = {
    "start_slot": 0,
    "allowed_failed_distributions": 3,
    "slash_ppm": 700_000,
    "unstake_delay_rounds": 2,
    "max_auditors": 5,
}


def call_of(tx: Mapping[str, Any]) -> tuple[str, tuple[Any, ...], int]:
    """The contract call (function, arguments, value in wei) for a rules transaction; Refused
    (malformed) for one the contract has no call for, or whose fields cannot be encoded."""
    op = tx.get("op")
    try:
        if op == "create_task":
            cfg = {**CONFIG_DEFAULTS, **{k: tx[k] for k in CONFIG_ORDER if k in tx}}
            config = tuple(cfg[k] for k in CONFIG_ORDER)
            return "createTask", (tx["task_id"], tx["name"], config), 0
        if op in ("fund", "stake"):
            return op, (tx["task_id"],), _wei(tx["amount"])
        if op == "unstake":
            return "unstake", (tx["task_id"], tx["amount"]), 0
        if op == "submit":
            return "submit", (tx["task_id"], tx["round"], tx["submission"]), 0
        if op == "audit":
            return "audit", (tx["task_id"], tx["round"], list(tx["invalid"])), 0
        if op == "submit_distribution":
            return (
                "submitDistribution",
                (tx["task_id"], tx["round"], tx["root"], tx["total"], tx["cid"]),
                0,
            )
        if op == "audit_distribution":
            return "auditDistribution", (tx["task_id"], tx["round"]), 0
        if op == "payout":
            return "payout", (tx["task_id"], tx["round"]), 0
        if op == "claim":
            return "claim", (tx["task_id"], tx["round"], tx["amount"], list(tx["proof"])), 0
    except KeyError as exc:
        raise Refused("malformed", f"{op} lacks {exc}") from None
    if op == "transfer":
        raise Refused(
            "malformed", "transfers on an EVM chain are plain value transfers, not contract calls"
        )
    raise Refused("malformed", f"unknown op {op!r}")


def _operation_key(tx: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two sends the same operation: op, task and round for the round's steps
    (the driver may rebuild the transaction), the whole transaction otherwise."""
    if "round" in tx:
        return (tx.get("op"), tx.get("task_id"), tx.get("round"))
    return tuple(sorted((k, repr(v)) for k, v in tx.items()))


def _wei(amount: Any) -> int:
    """An amount the rules accept (in gwei), in wei."""
    return rules.check_amount(amount) * GWEI


# event -> (the field naming its sender, the rules op, the fields it carries besides task_id)
EVENT_OPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "Funded": ("account", "fund", ("amount",)),
    "Staked": ("account", "stake", ("amount",)),
    "Unstaked": ("account", "unstake", ("amount",)),
    "Submitted": ("account", "submit", ("round", "submission")),
    "Audited": ("auditor", "audit", ("round", "invalid")),
    "DistributionSubmitted": ("distributor", "submit_distribution",
                              ("round", "root", "total", "cid")),
    "DistributionVoted": ("voter", "audit_distribution", ("round",)),
    "PaidOut": ("payer", "payout", ("round",)),
    "Claimed": ("account", "claim", ("round", "amount")),
}


def tx_of_event(
    name: str, args: Mapping[str, Any], task_ids: Mapping[bytes, str]
) -> tuple[str, dict[str, Any]] | None:
    """(sender, rules transaction without nonce) that an event records; None for events that
    record no transaction of their own (Slashed follows from the rules, PeerBound is not a
    settlement transaction). KeyError for an event of a task the replica has not seen."""
    if name == "TaskCreated":
        cfg = args["cfg"]
        values = dict(zip(CONFIG_ORDER, cfg, strict=True))
        values["code_hash"] = bytes(values["code_hash"])
        return args["owner"], {
            "op": "create_task",
            "task_id": args["taskId"],
            "name": args["name"],
            **values,
        }
    if name in ("Slashed", "PeerBound"):
        return None
    spec = EVENT_OPS.get(name)
    if spec is None:
        raise ValueError(f"unknown event {name}")
    sender_field, op, fields = spec
    tx: dict[str, Any] = {"op": op, "task_id": task_ids[bytes(args["taskKey"])]}
    for field_name in fields:
        value = args[field_name]
        tx[field_name] = bytes(value) if field_name == "root" else \
            list(value) if field_name == "invalid" else value
    if op == "claim":
        tx["proof"] = []  # checked by the contract; events carry no proofs
    return args[sender_field], tx


@dataclass
class Replica:
    """The settlement state rebuilt from the contract's events (pure: fed by the adapter)."""

    state: ChainState = field(default_factory=lambda: rules.genesis({}, leaf_format=EVM_LEAVES))
    task_ids: dict[bytes, str] = field(default_factory=dict)  # taskKey -> task id
    bindings: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # peer id, signature
    results: dict[bytes, dict[str, Any]] = field(default_factory=dict)  # tx hash -> result
    divergences: int = 0
    applied: int = 0
    synced_block: int = -1

    def feed(self, name: str, args: Mapping[str, Any], slot: int, tx_hash: bytes) -> None:
        """Apply one event of the contract, included at `slot`."""
        if name == "PeerBound":
            self.bindings[str(args["account"])] = (bytes(args["peerId"]), bytes(args["signature"]))
            return
        try:
            found = tx_of_event(name, args, self.task_ids)
        except KeyError:
            self.diverged(name, "an event of a task the replica never saw created")
            return
        if found is None:
            return
        sender, tx = found
        state = self.state
        if tx["op"] in ("fund", "stake"):  # the value came with the call, from outside
            state.balances[sender] = state.balances.get(sender, 0) + tx["amount"]
        tx["nonce"] = state.nonces.get(sender, 0)
        try:
            result = rules.apply(state, sender, tx, slot, proof_checked=True)
        except Refused as exc:
            self.diverged(name, f"the rules refuse what the contract accepted: {exc}")
            return
        self.applied += 1
        if tx["op"] == "create_task":
            self.task_ids[bytes(keccak(tx["task_id"].encode("utf-8")))] = tx["task_id"]
        self.results[tx_hash] = result
        if len(self.results) > 4_096:  # only the latest sends look their results up
            self.results.pop(next(iter(self.results)))

    def diverged(self, name: str, why: str) -> None:
        self.divergences += 1
        log.error(
            "EVM replica: %s event: %s (contract and rules disagree; views may be wrong)", name, why
        )


class EvmAdapter(ChainAdapter):
    """A node's view of a TaskSettlement contract, signing with `wallet`. Every JSON-RPC call
    runs in a trio worker thread (CapacityLimiter of 4: reads in parallel, sends numbered by
    the client). Open it with `await EvmAdapter.open(url, contract, wallet, identity)`."""

    slot_ms = SLOT_MS
    leaf_format = EVM_LEAVES

    def __init__(
        self,
        client: EvmClient,
        identity: Identity,
        chain_id: int,
        *,
        poll_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.identity = identity
        self.account = client.address
        self.contract = client.contract_address or ""
        self.chain_id_number = chain_id
        self.chain_id = f"evm:{chain_id}:{self.contract}"
        self.poll_interval = poll_interval
        self._clock = clock
        self._limiter = trio.CapacityLimiter(4)
        self._sync_lock = trio.Lock()
        self.replica = Replica()
        self._block_times: dict[int, int] = {}
        self._head_slot = 0
        self._node_of: dict[str, str | None] = {}
        self._unconfirmed: dict[tuple[Any, ...], TxUnconfirmed] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        contract: str,
        wallet: EvmWallet,
        identity: Identity,
        *,
        poll_interval: float = 0.05,
        bind: bool = True,
        timeout: float = 10.0,
    ) -> EvmAdapter:
        """Connect, check that `contract` is a TaskSettlement, catch up with its events and
        (with `bind`) bind this node's peer id to its wallet on chain if not bound yet.
        ChainUnavailable when the chain does not answer; ChainError for a wrong contract."""
        artifact = load_artifact()
        client = EvmClient(
            url, wallet, contract_address=contract, abi=artifact["abi"], timeout=timeout
        )
        try:
            chain_id = await trio.to_thread.run_sync(lambda: _checked(client, url, contract))
            adapter = cls(client, identity, chain_id, poll_interval=poll_interval)
            await adapter.sync()
            if bind:
                await adapter.ensure_binding()
        except BaseException:
            client.close()
            raise
        return adapter

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    # -- the replica -------------------------------------------------------------------------
    async def sync(self) -> int:
        """Catch the replica up with the chain's latest block; the block number."""
        async with self._sync_lock:
            latest = await self._run(self.client.block_number)
            start = self.replica.synced_block + 1
            while start <= latest:
                end = min(latest, start + LOG_CHUNK_BLOCKS - 1)
                logs = await self._run(partial(self.client.get_logs, start, end))
                await self._feed(logs)
                self.replica.synced_block = end
                start = end + 1
            return latest

    async def _feed(self, logs: list[dict[str, Any]]) -> None:
        for entry in logs:
            number = int(entry["blockNumber"], 16)
            slot = self._block_times.get(number)
            if slot is None:
                block = await self._run(partial(self.client.block, number))
                slot = self._block_times[number] = block.timestamp
                if len(self._block_times) > 4_096:
                    self._block_times.pop(next(iter(self._block_times)))
            self._head_slot = max(self._head_slot, slot)
            try:
                name, args = self.client.decode_log(entry)
            except ValueError as exc:
                self.replica.diverged("undecodable", str(exc))
                continue
            self.replica.feed(name, args, slot, bytes.fromhex(entry["transactionHash"][2:]))

    # -- ChainAdapter ------------------------------------------------------------------------
    async def now(self) -> int:
        return max(self._head_slot, int(self._clock()))

    async def send(self, tx: dict[str, Any]) -> Receipt:
        """Send `tx` as a contract call. When an earlier send of the same operation (same op,
        task and round) ended with its fate unknown, that very transaction is looked up and, if
        the node lost it, broadcast again (same bytes, same nonce): an operation is never sent
        as two transactions."""
        fn, args, value = call_of(tx)
        key = _operation_key(tx)
        earlier = self._unconfirmed.get(key)
        try:
            receipt = None
            if earlier is not None:
                receipt = await self._run(lambda: self._resume(earlier))
            if receipt is None:  # nothing sent before, or what was sent can never be included
                receipt = await self._run(lambda: self.client.send(fn, *args, value=value))
        except TxUnconfirmed as exc:
            self._unconfirmed[key] = exc
            if len(self._unconfirmed) > 64:
                self._unconfirmed.pop(next(iter(self._unconfirmed)))
            raise
        except Refused:
            self._unconfirmed.pop(key, None)
            raise
        self._unconfirmed.pop(key, None)
        await self.sync()
        slot = self._block_times.get(receipt.block_number)
        if slot is None:
            slot = (await self._run(lambda: self.client.block(receipt.block_number))).timestamp
        result = self.replica.results.get(receipt.tx_hash, {"ok": True, "op": tx.get("op")})
        return Receipt(
            height=receipt.block_number, slot=slot, tx_hash=receipt.tx_hash, result=result
        )

    def _resume(self, earlier: TxUnconfirmed) -> TxReceipt | None:
        """The receipt of a transaction whose fate was unknown: included (its receipt), or
        rebroadcast and waited for; TxUnconfirmed again when the node still has no answer;
        None when the node will never include it (its nonce went to another transaction):
        then the operation is sent anew."""
        receipt = self.client.receipt_of(earlier.tx_hash)
        if receipt is not None:
            return receipt
        if not self.client.transaction_known(earlier.tx_hash):
            log.info("EVM: resending transaction 0x%s (same bytes)", earlier.tx_hash.hex())
            self.client.rebroadcast(earlier.raw_tx)
            if not self.client.transaction_known(earlier.tx_hash):
                receipt = self.client.receipt_of(earlier.tx_hash)  # mined meanwhile?
                if receipt is None:
                    log.info("EVM: transaction 0x%s can never be included (its nonce is "
                             "spent); sending the operation anew", earlier.tx_hash.hex())
                return receipt
        receipt = self.client.receipt_of(earlier.tx_hash, timeout=self.client.receipt_timeout)
        if receipt is None:
            raise TxUnconfirmed(f"transaction 0x{earlier.tx_hash.hex()} is still not included",
                                earlier.tx_hash, earlier.raw_tx, broadcast=True)
        return receipt

    async def task(self, task_id: str) -> dict[str, Any] | None:
        await self.sync()
        if task_id not in self.replica.state.tasks:
            return None
        return rules.task_view(self.replica.state, task_id, await self.now())

    async def tasks(self) -> list[dict[str, Any]]:
        await self.sync()
        slot = await self.now()
        state = self.replica.state
        return [rules.task_view(state, task_id, slot) for task_id in sorted(state.tasks)]

    async def balance(self, account: str) -> int:
        wei: int = await self._run(lambda: self.client.balance(account))
        return wei // GWEI

    async def round_view(self, task_id: str, r: int) -> dict[str, Any]:
        await self.sync()
        return rules.round_view(self.replica.state, task_id, r, await self.now())

    async def height(self) -> int:
        return await self._run(self.client.block_number)

    async def wait_for_change(self, after_height: int, timeout: float) -> int:
        with trio.move_on_after(timeout):
            while True:
                height = await self.height()
                if height > after_height:
                    return height
                await trio.sleep(self.poll_interval)
        return await self.height()

    async def node_of(self, account: str) -> str | None:
        """The peer id bound to `account` on this contract, if its signature checks."""
        known = self._node_of.get(account)
        if known is not None:
            return known
        await self.sync()
        bound = self.replica.bindings.get(account)
        if bound is None:
            return None
        peer_bytes, signature = bound
        try:
            peer_id = ID(peer_bytes).to_base58()
        except Exception:
            return None
        ok = verify_binding(peer_id, signature, self.chain_id_number, self.contract, account)
        self._node_of[account] = peer_id if ok else None
        if not ok:
            log.warning("EVM account %s has a binding that does not verify", account)
        return peer_id if ok else None

    async def ensure_binding(self) -> None:
        """Bind this node's peer id to its wallet on chain unless it is bound already."""
        if await self.node_of(self.account) == self.identity.peer_id.to_base58():
            return
        signature = sign_binding(self.identity, self.chain_id_number, self.contract, self.account)
        peer_bytes = self.identity.peer_id.to_bytes()
        await self._run(lambda: self.client.send("bindPeer", peer_bytes, signature))
        self._node_of.pop(self.account, None)
        await self.sync()

    def describe(self) -> dict[str, Any]:
        return {"kind": "evm", "url": self.client.url, "chain_id": self.chain_id_number,
                "contract": self.contract, "synced_block": self.replica.synced_block,
                "events_applied": self.replica.applied,
                "replica_divergences": self.replica.divergences,
                "unconfirmed": len(self._unconfirmed)}

    async def close(self) -> None:
        self.client.close()


def _checked(client: EvmClient, url: str, contract: str) -> int:
    """The chain id, after checking the chain answers and `contract` is a TaskSettlement."""
    try:
        chain_id = client.chain_id
    except ChainUnavailable as exc:
        raise ChainUnavailable(f"no EVM node answers at {url}: {exc}") from None
    code = client.code_at(contract)
    if not code:
        raise ChainError(f"no contract at {contract} on chain {chain_id} ({url})")
    try:
        found = client.call("SETTLEMENT_ID")
    except (ChainError, Refused, ValueError) as exc:
        raise ChainError(f"the contract at {contract} is not a TaskSettlement ({exc})") from None
    if bytes(found) != settlement_id():
        raise ChainError(f"the contract at {contract} is not a TaskSettlement v1")
    return chain_id
