# Benchmark: settling task rounds on an EVM chain (chain/evm/TaskSettlement.sol, deployed on a
# local anvil; docs/evm-settlement.md). Prints one JSON line. Every anvil is started by this
# script on 127.0.0.1 (chain.evm.anvil.Anvil: the pinned binary) and stopped before the script
# exits, on an error too; all traffic goes to 127.0.0.1. Every transaction is a rules
# transaction mapped to its contract call by chain.evm.adapter.call_of and sent by
# chain.evm.client.EvmClient (estimated, signed locally, receipt awaited), except the raw
# reference of the throughput phases. Three measurements, on fresh anvils:
#
#   evm_gas_*             gas used (receipts) by each transaction of a round, on one anvil
#                         with controlled time (evm_setNextBlockTimestamp + evm_mine at each
#                         phase of the round, windows of minutes, so nothing depends on
#                         how long a phase takes). Tasks with max_auditors 5 and N real
#                         submitters for each N of --nodes (generated wallets funded with
#                         anvil_setBalance, each signing its own transactions), all running
#                         the same schedule: round 1 submissions (work 0), round 2
#                         submissions (work 1: each node settles its round-0 submission in
#                         it, as every working node does every round: the steady state),
#                         attempt 0 of round 0's distribution (an N-entry list of every
#                         submitter), its audit window (one distribution vote against it, a
#                         minority; one audit tx with 5 negative verdicts, one with 1), the
#                         payout and every node's claim. The headline per-operation figures
#                         come from the smallest N:
#     evm_gas_submit          the median of a steady-state round's submissions other than the
#                             first (evm_gas_submit_at_N for each N: submit gas does not
#                             depend on N, and these show it), evm_gas_first_submit the first
#                             submission of that round (it writes the round's counters and
#                             seed from zero), evm_gas_submit_new_node a node's first
#                             submission in a task (nothing to settle).
#     evm_gas_negative_votes_5  one audit tx carrying 5 negative verdicts (k = 5: N >= 6);
#                             evm_gas_negative_votes_1 one carrying 1.
#     evm_gas_audit_no_votes  0: a node that finds nothing invalid sends no audit tx
#                             (tasks/engine.py sends Audit only for invalid targets; the rules
#                             accept an empty list but do not need one), so it pays nothing.
#                             evm_gas_audit_empty_list_if_sent is what an empty audit would
#                             cost were it sent, for reference only.
#     evm_gas_distribution    submitDistribution; evm_gas_distribution_vote auditDistribution;
#                             evm_gas_payout payout; evm_gas_stake a node's first stake.
#     evm_gas_claim_N         the mean gas of claims with proofs from an N-entry list: for each
#                             N of --nodes every node of the round claims; for each L of
#                             --lists a task whose round-0 submitters (--claimers real
#                             wallets) are listed among L entries (the others arbitrary
#                             addresses: the contract only checks the proof against the
#                             accepted root), built with chain.merkle.distribution_root /
#                             distribution_proofs(entries, "evm"), and each of them claims.
#                             evm_claim_proof_hashes_N is their mean proof length (for a
#                             list, evm_list_proof_hashes_N that of all its entries: the
#                             claimers are a sample of them).
#     evm_gas_per_node_round_N  a node's share of a round's gas:
#                             submit_mean_N + (distribution_N + payout_N) / N + claim_N.
#                             For N in --nodes every part is measured in that task's round
#                             (evm_gas_submit_mean_N: the mean of its N steady-state
#                             submissions, evm_gas_distribution_at_N, evm_gas_payout_at_N).
#                             For N in --lists (too many nodes to run) it is computed:
#                             submit_mean_N = (evm_gas_first_submit + (N - 1) * evm_gas_submit)
#                             / N (submit gas does not depend on N), distribution and payout at
#                             the largest N of --nodes (submitDistribution depends on N through
#                             one prp evaluation only; payout not at all) and claim_N measured
#                             against the L-entry list. Audits and distribution votes are left
#                             out: an honest round sends none.
#   evm_settle_tx_per_s   transactions per second through the adapter path: EvmClient.send of
#                         `fund` (1 gwei), mapped by call_of, from one wallet, sequentially,
#                         each receipt awaited before the next send (what a node does: the
#                         adapter sends one at a time), EvmClient as a node opens it (sync_send
#                         off: estimate, sign, eth_sendRawTransaction, poll for the receipt).
#   raw_tx_per_s          the reference: the same number of transactions with the same call
#                         data, gas limit and fee rule (taken from one sent through the
#                         adapter) from another wallet, all signed before the phase, then sent
#                         one at a time with eth_sendRawTransaction over one kept-alive
#                         http.client connection, each receipt polled for (1 ms apart) before
#                         the next send. evm_ratio = adapter / raw (target >= 0.8: reported,
#                         not asserted). Every phase (--tx sends after one untimed warm-up)
#                         runs on a fresh anvil with a fresh contract: anvil slows as its chain
#                         grows (a send and its block take ~4x longer after 3,000 blocks), so
#                         each phase sees the same chain sizes. The phases rotate --repeats
#                         times (the machine is shared and noisy: each kind runs first,
#                         middle and last in turn); a rate is over all of its phases
#                         (*_tx_per_s_phases: each phase's, in the order they ran).
#                         evm_settle_sync_tx_per_s: the adapter path with
#                         EvmClient(sync_send=True) (eth_sendRawTransactionSync, the receipt in
#                         the same round trip), in the same rotation, for reference.
#   round_settle_s_N      on an anvil mining a block a second (Anvil(block_time=1)), N nodes
#                         (--settle-nodes; funded, staked) submit for round 0 at once, each from
#                         its own thread with its own EvmClient, as soon as round 1's submission
#                         window (--settle-window seconds) opens on the wall clock (which is
#                         how EvmAdapter.now() reads the slot); after it closes the distributor
#                         of attempt 0 (found from the Submitted events and the contract's
#                         seed) sends the list of every submitter as soon as round 2's
#                         submission window opens. Seconds from the first submission sent to
#                         the distribution's receipt; round_settle_submitted_N how many of the N
#                         submissions were included. The rules make the distribution wait for
#                         round r+2 (round_time = window + a 2 s audit window):
#                         round_settle_wait_s_N is the time from the first submission to that
#                         window opening, round_settle_distribution_s_N the rest (the
#                         distribution's own send, block and receipt).
# --quick runs small sizes (the smoke test); anvil_version and the sizes are printed too.
# Must not live here: anything a node or the chain adapter needs (chain/evm provides it; this
# script only drives it).
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # first: this file's name would shadow the `chain` package

import eth_abi  # noqa: E402
from _common import finish, ratio, run_steps  # noqa: E402
from eth_utils import keccak  # noqa: E402

from chain.assignment import audit_seed, distributor_of, targets_of  # noqa: E402
from chain.evm.adapter import GWEI, call_of, load_artifact  # noqa: E402
from chain.evm.anvil import Anvil, find_anvil  # noqa: E402
from chain.evm.client import EvmClient, TxReceipt  # noqa: E402
from chain.evm.wallet import EvmWallet  # noqa: E402
from chain.merkle import distribution_proofs, distribution_root  # noqa: E402
from chain.rules import Refused  # noqa: E402

MAX_AUDITORS = 5
AMOUNT = 1_000  # gwei each listed node is paid
MIN_STAKE = 1_000_000  # gwei
NODE_BALANCE_WEI = 10**21
CODE_HASH = keccak(b"tasknet benchmarks/chain.py")
CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"  # a CIDv1's length
# the gas phases' schedule (slots are seconds of block time, set by the script)
GAS_ROUND_TIME = 600
GAS_WINDOW = 200  # submission and audit windows
GAS_SETUP_SLOTS = 1_200  # the task starts this long after the setup began (never reached)
SETTLE_AUDIT_WINDOW = 2
RECEIPT_POLL_S = 0.001  # the raw reference's pause between receipt polls


# -- the contract on one anvil -------------------------------------------------------------

class Contract:
    """A freshly deployed TaskSettlement on one anvil; the owner (anvil's first dev account)
    and a client for every other wallet, all closed by `close`."""

    def __init__(self, anvil: Anvil) -> None:
        self.url = anvil.url
        self.artifact = load_artifact()
        self._clients: list[EvmClient] = []
        self._lock = threading.Lock()
        deployer = EvmClient(self.url, EvmWallet(anvil.dev_keys[0]))
        try:
            self.address = deployer.deploy(self.artifact)
        finally:
            deployer.close()
        self.owner = self.client(EvmWallet(anvil.dev_keys[0]))

    def client(self, wallet: EvmWallet, **options: Any) -> EvmClient:
        client = EvmClient(self.url, wallet, contract_address=self.address,
                           abi=self.artifact["abi"], **options)
        with self._lock:
            self._clients.append(client)
        return client

    def new_nodes(self, count: int) -> list[EvmClient]:
        """`count` fresh wallets, each funded with anvil_setBalance, each with its client."""
        clients = []
        for _ in range(count):
            wallet = EvmWallet.generate()
            self.rpc("anvil_setBalance", [wallet.address, hex(NODE_BALANCE_WEI)])
            clients.append(self.client(wallet))
        return clients

    def rpc(self, method: str, params: list[Any]) -> Any:
        return self.owner._request(method, params)

    def now(self) -> int:
        return self.owner.block("latest").timestamp

    def jump(self, slot: int) -> None:
        """Mine a block at `slot`: block time goes on from there with the wall clock."""
        self.rpc("evm_setNextBlockTimestamp", [slot])
        self.rpc("evm_mine", [])

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def send(client: EvmClient, tx: dict[str, Any]) -> TxReceipt:
    """A rules transaction as the adapter sends it: call_of, then EvmClient.send."""
    fn, args, value = call_of(tx)
    return client.send(fn, *args, value=value)


def create_task(owner: EvmClient, task_id: str, *, start: int, round_time: int,
                submission_window: int, audit_window: int, bounty: int) -> None:
    send(owner, {"op": "create_task", "task_id": task_id, "name": task_id,
                 "code_hash": CODE_HASH, "round_time": round_time,
                 "submission_window": submission_window, "audit_window": audit_window,
                 "min_stake": MIN_STAKE, "bounty_per_round": bounty, "start_slot": start,
                 "max_auditors": MAX_AUDITORS})
    if bounty:
        send(owner, {"op": "fund", "task_id": task_id, "amount": bounty})


def submission(r: int, i: int) -> str:
    return f"work of round {r:03d} by node {i:06d}"  # one length: one calldata cost


# -- gas ------------------------------------------------------------------------------------

@dataclass
class GasTask:
    """One task of the gas schedule: its nodes, their round-0 list and the gas seen."""

    task_id: str
    nodes: list[EvmClient]
    listing: dict[str, int]  # round 0's distribution list (account -> gwei)
    measured: bool  # a real round of N nodes (else a claim-list task)
    distributor: str = ""  # of round 0's attempt 0
    gas: dict[str, list[int]] = field(default_factory=dict)
    proof_hashes: list[int] = field(default_factory=list)  # the claimers' proofs
    list_proof_hashes: float = 0.0  # the mean over every entry of the list

    def note(self, name: str, receipt: TxReceipt) -> None:
        self.gas.setdefault(name, []).append(receipt.gas_used)

    def submit_all(self, r: int, name: str) -> list[str]:
        """Every node submits for round r, in order; the submissions in inclusion order."""
        texts = []
        for i, node in enumerate(self.nodes):
            text = submission(r, i)
            self.note(name, send(node, {"op": "submit", "task_id": self.task_id, "round": r,
                                        "submission": text}))
            texts.append(text)
        return texts

    def by_account(self, account: str) -> EvmClient:
        return next(n for n in self.nodes if n.address == account)


def measure_gas(anvil: Anvil, node_sizes: list[int], list_sizes: list[int], claimers: int,
                out: dict[str, Any]) -> None:
    """The evm_gas_* figures into `out`."""
    world = Contract(anvil)
    try:
        _gas_schedule(world, node_sizes, list_sizes, claimers, out)
    finally:
        world.close()


def _gas_schedule(world: Contract, node_sizes: list[int], list_sizes: list[int],
                  claimers: int, out: dict[str, Any]) -> None:
    owner = world.owner
    rt, sw, aw = GAS_ROUND_TIME, GAS_WINDOW, GAS_WINDOW
    start = world.now() + GAS_SETUP_SLOTS
    wallets = world.new_nodes(max(node_sizes))
    tasks: list[GasTask] = []
    for n in node_sizes:
        nodes = wallets[:n]
        tasks.append(GasTask(f"gas-{n}", nodes, {c.address: AMOUNT for c in nodes}, True))
    for size in list_sizes:
        nodes = wallets[:claimers]
        listing = {c.address: AMOUNT for c in nodes}
        for i in range(size - len(nodes)):
            listing["0x" + keccak(b"filler %d %d" % (size, i))[:20].hex()] = AMOUNT
        tasks.append(GasTask(f"claims-{size}", nodes, listing, False))
    for task in tasks:
        create_task(owner, task.task_id, start=start, round_time=rt, submission_window=sw,
                    audit_window=aw, bounty=AMOUNT * len(task.listing))
        for node in task.nodes:
            task.note("stake", send(node, {"op": "stake", "task_id": task.task_id,
                                           "amount": MIN_STAKE}))
    if world.now() >= start:
        raise RuntimeError("the gas setup outlasted its margin: the task started")

    # round 1, submission window: the work of round 0 (every node's first submission)
    world.jump(start + rt)
    texts0 = {t.task_id: t.submit_all(0, "submit_r0") for t in tasks}

    # round 2, submission window: the work of round 1 (steady state), round 0's list
    world.jump(start + 2 * rt)
    texts1 = {t.task_id: t.submit_all(1, "submit_r1") for t in tasks if t.measured}
    for task in tasks:
        seed = audit_seed(task.task_id, 0, texts0[task.task_id])
        if owner.call("roundInfo", task.task_id, 0)[0] != seed:
            raise RuntimeError(f"{task.task_id}: the contract's seed of round 0 is not ours")
        order = [n.address for n in task.nodes]  # inclusion order: sent one at a time
        task.distributor = distributor_of(seed, order, 0)
        root = distribution_root(task.listing, "evm")
        task.note("distribution", send(
            task.by_account(task.distributor),
            {"op": "submit_distribution", "task_id": task.task_id, "round": 0, "root": root,
             "total": AMOUNT * len(task.listing), "cid": CID}))

    # round 2, audit window: a distribution vote (a minority), audits of round 1's work
    world.jump(start + 2 * rt + sw)
    for task in tasks:
        if not task.measured:
            continue
        order = [n.address for n in task.nodes]
        voter = next(a for a in order if a != task.distributor)
        task.note("distribution_vote", send(task.by_account(voter), {
            "op": "audit_distribution", "task_id": task.task_id, "round": 0}))
        if len(order) < MAX_AUDITORS + 1:
            continue  # k < 5: no audit with 5 verdicts
        seed = audit_seed(task.task_id, 1, texts1[task.task_id])
        five, one, empty = order[0], order[1], order[2]
        for auditor, invalid, name in (
                (five, targets_of(seed, order, five, MAX_AUDITORS), "negative_votes_5"),
                (one, targets_of(seed, order, one, MAX_AUDITORS)[:1], "negative_votes_1"),
                (empty, [], "audit_empty")):
            task.note(name, send(task.by_account(auditor), {
                "op": "audit", "task_id": task.task_id, "round": 1, "invalid": invalid}))
        if owner.call("roundInfo", task.task_id, 1)[2] != 0:
            raise RuntimeError(f"{task.task_id}: the audits rejected a submission")

    # after round 2's audit window: the payout, then the claims of round 0
    world.jump(start + 2 * rt + sw + aw)
    for task in tasks:
        task.note("payout", send(owner, {"op": "payout", "task_id": task.task_id, "round": 0}))
        proofs = distribution_proofs(task.listing, "evm")
        task.list_proof_hashes = statistics.fmean(len(p) for p in proofs.values())
        for node in task.nodes:
            proof = proofs[node.address]
            task.proof_hashes.append(len(proof))
            task.note("claim", send(node, {"op": "claim", "task_id": task.task_id,
                                           "round": 0, "amount": AMOUNT, "proof": proof}))
    _gas_figures(tasks, node_sizes, list_sizes, out)


def _gas_figures(tasks: list[GasTask], node_sizes: list[int], list_sizes: list[int],
                 out: dict[str, Any]) -> None:
    by_size = {len(t.nodes): t for t in tasks if t.measured}
    lists = {len(t.listing): t for t in tasks if not t.measured}
    small, large = by_size[min(node_sizes)], by_size[max(node_sizes)]
    steady = small.gas["submit_r1"]
    first, typical = steady[0], round(statistics.median(steady[1:]))
    out.update({
        "evm_gas_submit": typical,
        "evm_gas_first_submit": first,
        "evm_gas_submit_new_node": round(statistics.median(small.gas["submit_r0"][1:])),
        "evm_gas_stake": round(statistics.median(small.gas["stake"])),
        "evm_gas_distribution": small.gas["distribution"][0],
        "evm_gas_distribution_vote": small.gas["distribution_vote"][0],
        "evm_gas_payout": small.gas["payout"][0],
        "evm_gas_audit_no_votes": 0,
        "evm_gas_audit_no_votes_note": (
            "a node that finds nothing invalid sends no audit tx (tasks/engine.py), so it "
            "pays 0; evm_gas_audit_empty_list_if_sent is the cost of an empty audit, for "
            "reference only"),
    })
    if "negative_votes_5" in small.gas:
        out["evm_gas_negative_votes_5"] = small.gas["negative_votes_5"][0]
        out["evm_gas_negative_votes_1"] = small.gas["negative_votes_1"][0]
        out["evm_gas_audit_empty_list_if_sent"] = small.gas["audit_empty"][0]
    for n, task in sorted(by_size.items()):
        submits = task.gas["submit_r1"]
        parts = {
            "submit_mean": statistics.fmean(submits),
            "distribution": task.gas["distribution"][0],
            "payout": task.gas["payout"][0],
            "claim": statistics.fmean(task.gas["claim"]),
        }
        out[f"evm_gas_submit_at_{n}"] = round(statistics.median(submits[1:]))
        out[f"evm_gas_first_submit_at_{n}"] = submits[0]
        out[f"evm_gas_distribution_at_{n}"] = parts["distribution"]
        out[f"evm_gas_payout_at_{n}"] = parts["payout"]
        _per_node(n, parts, task.proof_hashes, out)
    for size, task in sorted(lists.items()):
        parts = {
            "submit_mean": (first + (size - 1) * typical) / size,
            "distribution": large.gas["distribution"][0],
            "payout": large.gas["payout"][0],
            "claim": statistics.fmean(task.gas["claim"]),
        }
        out[f"evm_gas_distribution_list_{size}"] = task.gas["distribution"][0]
        out[f"evm_list_proof_hashes_{size}"] = round(task.list_proof_hashes, 2)
        _per_node(size, parts, task.proof_hashes, out)
    out["evm_gas_per_node_basis"] = (
        f"submit_mean_N + (distribution + payout) / N + claim_N; measured rounds for N in "
        f"{sorted(by_size)}; for N in {sorted(lists)}: submit_mean_N from evm_gas_first_submit "
        f"and evm_gas_submit, distribution and payout at {max(node_sizes)}, claims against "
        f"an N-entry list")


def _per_node(n: int, parts: dict[str, float], proof_hashes: list[int],
              out: dict[str, Any]) -> None:
    submit_mean = round(parts["submit_mean"], 1)
    claim = round(parts["claim"], 1)
    out[f"evm_gas_submit_mean_{n}"] = submit_mean
    out[f"evm_gas_claim_{n}"] = claim
    out[f"evm_claim_proof_hashes_{n}"] = round(statistics.fmean(proof_hashes), 2)
    out[f"evm_gas_per_node_round_{n}"] = round(
        submit_mean + (parts["distribution"] + parts["payout"]) / n + claim)


# -- throughput: the adapter path against raw eth_sendRawTransaction -------------------------

class RawRpc:
    """JSON-RPC over one kept-alive http.client connection: the reference's transport."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self._id = 0

    def call(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self._id, "method": method,
                           "params": params})
        self._conn.request("POST", "/", body, {"Content-Type": "application/json"})
        reply = json.loads(self._conn.getresponse().read())
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self._conn.close()


@dataclass
class Rate:
    count: int = 0
    seconds: float = 0.0
    phases: list[float] = field(default_factory=list)  # each phase's rate, in order

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.seconds += seconds
        self.phases.append(round(count / seconds, 1))

    @property
    def per_s(self) -> float:
        return round(self.count / self.seconds, 1) if self.seconds > 0 else 0.0


KINDS = ("adapter", "raw", "sync")
THROUGHPUT_TASK = "throughput"
FUND = {"op": "fund", "task_id": THROUGHPUT_TASK, "amount": 1}


def measure_throughput(count: int, repeats: int, pids: list[int], out: dict[str, Any]) -> None:
    """evm_settle_tx_per_s, raw_tx_per_s, evm_ratio and evm_settle_sync_tx_per_s into `out`:
    `repeats` rotations of the three kinds of phase, each phase on a fresh anvil."""
    rates = {kind: Rate() for kind in KINDS}
    for i in range(repeats):
        for kind in KINDS[i % 3:] + KINDS[:i % 3]:  # each kind first, middle and last in turn
            _on_anvil({}, partial(_phase, kind=kind, count=count, rate=rates[kind]), pids)
    ours, raw, sync = rates["adapter"], rates["raw"], rates["sync"]
    out.update({
        "evm_settle_tx": ours.count, "evm_settle_s": round(ours.seconds, 3),
        "evm_settle_tx_per_s": ours.per_s,
        "raw_tx": raw.count, "raw_s": round(raw.seconds, 3), "raw_tx_per_s": raw.per_s,
        "evm_ratio": ratio(ours.per_s, raw.per_s),
        "evm_settle_sync_tx": sync.count, "evm_settle_sync_s": round(sync.seconds, 3),
        "evm_settle_sync_tx_per_s": sync.per_s, "evm_sync_ratio": ratio(sync.per_s, raw.per_s),
        "evm_settle_tx_per_s_phases": ours.phases, "raw_tx_per_s_phases": raw.phases,
        "evm_settle_sync_tx_per_s_phases": sync.phases,
        "throughput_tx_per_phase": count, "throughput_repeats": repeats,
        "throughput_call": "fund(string) payable, 1 gwei",
    })


def _phase(anvil: Anvil, kind: str, count: int, rate: Rate) -> None:
    """One timed phase of `count` sends of `kind` on a fresh contract."""
    world = Contract(anvil)
    raw_rpc = RawRpc(anvil.url)
    try:
        create_task(world.owner, THROUGHPUT_TASK, start=0, round_time=60,
                    submission_window=20, audit_window=20, bounty=0)
        if kind == "raw":
            raws = _signed_like_the_adapter(world, anvil, raw_rpc, count + 1)
            _raw_send(raw_rpc, raws[:1])  # warm-up: the connection
            started = time.perf_counter()
            _raw_send(raw_rpc, raws[1:])
            expected = count + 2  # the adapter's probe, the warm-up, the phase
        else:
            client = world.client(EvmWallet(anvil.dev_keys[1]), sync_send=kind == "sync")
            send(client, FUND)  # warm-up: the connection, the local nonce
            started = time.perf_counter()
            for _ in range(count):
                send(client, FUND)
            expected = count + 1
        rate.add(count, time.perf_counter() - started)
        pool = int(world.owner.call("poolOf", THROUGHPUT_TASK))
        if pool != expected:
            raise RuntimeError(f"{kind}: the pool holds {pool} gwei, expected {expected}")
    finally:
        raw_rpc.close()
        world.close()


def _signed_like_the_adapter(world: Contract, anvil: Anvil, raw_rpc: RawRpc,
                             count: int) -> list[str]:
    """`count` raw transactions from another wallet with the call data and gas limit of the
    adapter's `fund` (one sent through the adapter to see them) and its fee rule."""
    probe = send(world.client(EvmWallet(anvil.dev_keys[2])), FUND)
    tx = raw_rpc.call("eth_getTransactionByHash", ["0x" + probe.tx_hash.hex()])
    data = keccak(b"fund(string)")[:4] + eth_abi.encode(["string"], [THROUGHPUT_TASK])
    if bytes.fromhex(tx["input"][2:]) != data:
        raise RuntimeError("the reference's call data differs from the adapter's")
    wallet = EvmWallet(anvil.dev_keys[3])
    nonce = int(raw_rpc.call("eth_getTransactionCount", [wallet.address, "pending"]), 16)
    price = int(raw_rpc.call("eth_gasPrice", []), 16)
    base = int(raw_rpc.call("eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    tip = max(price - base, 1)
    fixed = {"chainId": int(raw_rpc.call("eth_chainId", []), 16), "value": GWEI,
             "to": bytes.fromhex(world.address[2:]), "data": data, "gas": int(tx["gas"], 16),
             "type": 2, "maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip}
    return ["0x" + wallet.sign_transaction({**fixed, "nonce": nonce + i}).hex()
            for i in range(count)]


def _raw_send(raw_rpc: RawRpc, raws: list[str]) -> None:
    """Send each, then poll for its receipt before the next."""
    for raw in raws:
        tx_hash = raw_rpc.call("eth_sendRawTransaction", [raw])
        while (receipt := raw_rpc.call("eth_getTransactionReceipt", [tx_hash])) is None:
            time.sleep(RECEIPT_POLL_S)
        if int(receipt["status"], 16) != 1:
            raise RuntimeError(f"raw transaction {tx_hash} reverted")


# -- one round of N nodes on a chain with a block a second -----------------------------------

@dataclass
class Submitted:
    sent: float  # perf_counter when its thread sent it
    done: float | None = None  # when its receipt came, None if it was not included
    block: int | None = None
    error: str | None = None
    retries: int = 0


def _wait_until(unix_time: float) -> None:
    while (left := unix_time - time.time()) > 0:
        time.sleep(min(left, 0.05))


def measure_settle(anvil: Anvil, n: int, window: int, out: dict[str, Any]) -> None:
    """round_settle_s_N and the figures around it into `out`."""
    world = Contract(anvil)
    try:
        _settle(world, n, window, out)
    finally:
        world.close()


def _settle(world: Contract, n: int, window: int, out: dict[str, Any]) -> None:
    owner, task_id = world.owner, "settle"
    rt = window + SETTLE_AUDIT_WINDOW
    nodes = world.new_nodes(n)
    lead = 8 + n // 20  # seconds for creating, funding and staking (a block a second)
    start = world.now() + lead - rt  # round 1, whose window takes the work of 0, in `lead` s
    opens, closes = start + rt, start + rt + window
    create_task(owner, task_id, start=start, round_time=rt, submission_window=window,
                audit_window=SETTLE_AUDIT_WINDOW, bounty=AMOUNT * n)
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda c: send(c, {"op": "stake", "task_id": task_id,
                                         "amount": MIN_STAKE}), nodes))
    if time.time() >= opens:
        raise RuntimeError(f"staking {n} nodes outlasted the {lead} s lead")
    _wait_until(opens)

    results = [Submitted(0.0) for _ in nodes]
    go = threading.Barrier(n)

    def submit(i: int) -> None:
        go.wait()
        result = results[i]
        result.sent = time.perf_counter()
        tx = {"op": "submit", "task_id": task_id, "round": 0, "submission": submission(0, i)}
        while True:
            try:
                receipt = send(nodes[i], tx)
            except Refused as exc:  # the node's clock ran ahead of the chain's: try again
                if exc.reason == "outside_window" and time.time() < closes - 1:
                    result.retries += 1
                    time.sleep(0.05)
                    continue
                result.error = str(exc)
                return
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                return
            result.done, result.block = time.perf_counter(), receipt.block_number
            return

    threads = [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = min(r.sent for r in results)
    done = [r for r in results if r.done is not None]
    if not done:
        raise RuntimeError(f"no submission was included: {results[0].error}")

    # after the window: the distributor of attempt 0 sends the list once round 2's opens
    _wait_until(closes)
    while world.now() < closes:
        time.sleep(0.05)
    logs = owner.get_logs(0, "latest", events=["Submitted"])
    included = [args for args in (owner.decode_log(entry)[1] for entry in logs)
                if args["round"] == 0]  # in chain order: the submitters' indices
    accounts = [str(args["account"]) for args in included]
    seed = audit_seed(task_id, 0, [str(args["submission"]) for args in included])
    if owner.call("roundInfo", task_id, 0)[0] != seed:
        raise RuntimeError("the contract's seed of round 0 is not the one of its events")
    distributor = next(c for c in nodes if c.address == distributor_of(seed, accounts, 0))
    listing = dict.fromkeys(accounts, AMOUNT)
    tx = {"op": "submit_distribution", "task_id": task_id, "round": 0,
          "root": distribution_root(listing, "evm"), "total": AMOUNT * len(listing),
          "cid": CID}
    _wait_until(start + 2 * rt)
    # when round 2 opened on the wall clock, on the perf_counter clock (the script may get
    # here late: that delay is the distribution's, not the schedule's)
    opened = time.perf_counter() - (time.time() - (start + 2 * rt))
    retries = 0
    while True:
        try:
            send(distributor, tx)
            break
        except Refused as exc:
            if exc.reason != "outside_window" or retries >= 40:
                raise
            retries += 1
            time.sleep(0.05)
    end = time.perf_counter()
    latencies = sorted(r.done - r.sent for r in done if r.done is not None)
    errors = sorted({r.error for r in results if r.error})
    out.update({
        f"round_settle_s_{n}": round(end - first, 3),
        f"round_settle_submitted_{n}": len(done),
        f"round_settle_wait_s_{n}": round(opened - first, 3),
        f"round_settle_distribution_s_{n}": round(end - opened, 3),
        f"round_settle_submit_span_s_{n}": round(max(r.done or 0.0 for r in done) - first, 3),
        f"round_settle_submit_p50_s_{n}": round(statistics.median(latencies), 3),
        f"round_settle_submit_max_s_{n}": round(latencies[-1], 3),
        f"round_settle_submit_blocks_{n}": len({r.block for r in done}),
        f"round_settle_submit_retries_{n}": sum(r.retries for r in results),
        "round_settle_nodes": n, "round_settle_window_s": window,
        "round_settle_round_time_s": rt, "round_settle_block_time_s": 1,
        "round_settle_distribution_retries": retries,
    })
    if errors:
        out[f"round_settle_errors_{n}"] = errors[:3]


# -- main -----------------------------------------------------------------------------------

PROFILES = {  # --quick, full size
    "nodes": ("6,10", "10,100"), "lists": ("100,1000", "1000,10000"), "claimers": (3, 4),
    "tx": (50, 400), "repeats": (2, 6), "settle_nodes": (10, 100), "settle_window": (4, 10),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark EVM settlement (TaskSettlement on a local anvil): gas per "
        "operation and per node and round, the adapter's tx/s against raw "
        "eth_sendRawTransaction, a round of N nodes on a chain with a block a second. Prints "
        "one JSON line; see the header of this file for the method.")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--nodes", help="sizes of the rounds run for gas (10,100)")
    parser.add_argument("--lists", help="sizes of the claim lists (1000,10000)")
    parser.add_argument("--claimers", type=int, help="real claimers per claim list (4)")
    parser.add_argument("--tx", type=int, help="transactions per throughput phase (400)")
    parser.add_argument("--repeats", type=int, help="rotations of the throughput phases (6)")
    parser.add_argument("--settle-nodes", type=int, help="nodes of the timed round (100)")
    parser.add_argument("--settle-window", type=int,
                        help="submission window of the timed round, seconds (10)")
    args = parser.parse_args(argv)
    for name, profile in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, profile[0 if args.quick else 1])
    try:
        args.node_sizes = sorted({int(n) for n in str(args.nodes).split(",") if n})
        args.list_sizes = sorted({int(n) for n in str(args.lists).split(",") if n})
    except ValueError:
        parser.error("--nodes, --lists: numbers separated by commas")
    if not args.node_sizes or not args.list_sizes or min(args.node_sizes) < MAX_AUDITORS + 1:
        parser.error(f"--nodes: at least one size, each >= {MAX_AUDITORS + 1} (k = 5)")
    if set(args.node_sizes) & set(args.list_sizes):
        parser.error("--lists and --nodes must not share a size")
    if not 1 <= args.claimers <= min(args.node_sizes) or args.claimers > min(args.list_sizes):
        parser.error("--claimers: at least 1, at most the smallest of --nodes and --lists")
    if min(args.tx, args.repeats, args.settle_nodes) < 1 or args.settle_window < 2:
        parser.error("sizes must be positive, --settle-window at least 2")
    return args


def anvil_version() -> str:
    done = subprocess.run([str(find_anvil()), "--version"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    return done.stdout.splitlines()[0].strip() if done.stdout else "unknown"


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: every anvil is stopped on the way out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    out: dict[str, Any] = {
        "bench": "chain", "evm_nodes": args.node_sizes, "evm_lists": args.list_sizes,
        "evm_claimers_per_list": args.claimers, "evm_max_auditors": MAX_AUDITORS,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    try:
        out["anvil_version"] = anvil_version()
    except Exception as exc:
        return finish("chain", out, f"anvil: {type(exc).__name__}: {exc}")
    pids: list[int] = out.setdefault("anvil_pids", [])
    steps: list[tuple[str, Callable[[], None]]] = [
        ("gas", lambda: _on_anvil({}, lambda a: measure_gas(
            a, args.node_sizes, args.list_sizes, args.claimers, out), pids)),
        ("throughput", lambda: measure_throughput(args.tx, args.repeats, pids, out)),
        ("settle", lambda: _on_anvil({"block_time": 1}, lambda a: measure_settle(
            a, args.settle_nodes, args.settle_window, out), pids)),
    ]
    error = run_steps(steps)
    out["bench_s"] = round(time.perf_counter() - started, 1)
    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return finish("chain", out, error)


def _on_anvil(options: dict[str, Any], measure: Callable[[Anvil], None],
              pids: list[int]) -> None:
    """`measure` on a fresh anvil, stopped (SIGKILL after 5 s) whatever happens; its pid is
    noted in `pids` (printed, so a test can check that none is left)."""
    with Anvil(**options) as anvil:
        pids.append(anvil.pid)
        measure(anvil)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
