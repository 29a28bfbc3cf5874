# TaskSettlement (chain/evm/TaskSettlement.sol) on a real anvil: its keyed permutation and
# Merkle checks equal the Python ones (docs/evm-settlement.md, chain/merkle.py), an honest round
# of 3 nodes runs from task creation to the last claim, a round of 7 with a rejected submitter,
# a rejected list and a slashed distributor settles as the rules say, a lone submitter and a
# round of 65 (k = 64) work, strings are UTF-8 as Python's str, and every refusal reverts with
# `Refused(code)`, code = the index of the reason in chain.rules.REASON_CODES.
# Time is the block timestamp: each transaction is mined on its own at the slot the test sets
# (evm_setNextBlockTimestamp), one at a time, each receipt awaited. Gas of the main operations
# is printed (pytest -s) and bounded.
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from eth_utils import keccak
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractCustomError

from chain.evm.anvil import Anvil
from chain.merkle import MerkleTree
from chain.rules import REASON_CODES

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "chain/evm/TaskSettlement.json"
GWEI = 10**9
GAS = 3_000_000
REFUSED = keccak(b"Refused(uint8)")[:4]
MAX_ROUND_FIELD = 2**63 - 1 - 2 - 64
GAS_SEEN: dict[str, int] = {}
# regression bounds for what every node sends each round (measured: see the module's output)
GAS_BOUNDS = {
    "submit": 90_000,
    "audit (5 targets)": 115_000,
    "submitDistribution": 120_000,
    "auditDistribution": 60_000,
    "claim": 70_000,
    "audit k=64 (64 targets)": 1_000_000,
}


# --- anvil and the deployed contract ---


class Chain:
    """The deployed contract and the helpers that send one transaction at a given slot."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        self.accounts = w3.eth.accounts
        art = json.loads(ARTIFACT.read_text())
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = factory.constructor().transact({"from": self.accounts[0], "gas": 8_000_000})
        receipt = w3.eth.wait_for_transaction_receipt(tx, timeout=10)
        assert receipt.status == 1
        GAS_SEEN["deploy"] = receipt.gasUsed
        self.c = w3.eth.contract(address=receipt.contractAddress, abi=art["abi"])
        self.topics = {
            "0x" + keccak(text=f"{e['name']}({_types(e['inputs'])})").hex(): e["name"]
            for e in art["abi"]
            if e["type"] == "event"
        }

    @property
    def fn(self) -> Any:
        return self.c.functions

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def _send(self, call: Any, sender: str, slot: int, value: int) -> Any:
        reply = self.w3.provider.make_request("evm_setNextBlockTimestamp", [slot])
        assert "error" not in reply, reply
        tx = call.transact({"from": sender, "value": value, "gas": GAS})  # no estimate
        receipt = self.w3.eth.wait_for_transaction_receipt(tx, timeout=10)
        assert self.w3.eth.get_block(receipt.blockNumber)["timestamp"] == slot
        return receipt

    def ok(self, call: Any, sender: str, slot: int, value: int = 0, gas: str = "") -> Any:
        receipt = self._send(call, sender, slot, value)
        if receipt.status != 1:
            pytest.fail(f"{call.fn_name} by {sender} at {slot} refused: {self.reason(receipt)}")
        if gas:
            GAS_SEEN[gas] = receipt.gasUsed
            assert receipt.gasUsed <= GAS_BOUNDS.get(gas, GAS), (gas, receipt.gasUsed)
        return receipt

    def refused(self, call: Any, sender: str, slot: int, value: int = 0) -> str:
        receipt = self._send(call, sender, slot, value)
        assert receipt.status == 0, f"{call.fn_name} was accepted"
        return self.reason(receipt)

    def reason(self, receipt: Any) -> str:
        trace = self.w3.provider.make_request(
            "debug_traceTransaction",
            [receipt.transactionHash.to_0x_hex(), {"tracer": "callTracer"}],
        )
        return _decode_refusal(bytes.fromhex(trace["result"].get("output", "0x")[2:]))

    def events(self, receipt: Any) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for log in receipt.logs:
            name = self.topics[log.topics[0].to_0x_hex()]
            out.append((name, dict(self.c.events[name]().process_log(log).args)))
        return out

    def paid_wei(self, receipt: Any) -> int:
        return receipt.gasUsed * receipt.effectiveGasPrice


def _types(params: list[dict[str, Any]]) -> str:
    def one(p: dict[str, Any]) -> str:
        if p["type"] == "tuple":
            return "(" + ",".join(one(c) for c in p["components"]) + ")"
        return p["type"]

    return ",".join(one(p) for p in params)


def _decode_refusal(data: bytes) -> str:
    assert data[:4] == REFUSED and len(data) == 36, f"not a Refused(uint8) revert: {data.hex()}"
    return REASON_CODES[int.from_bytes(data[4:], "big")]


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with Anvil() as anvil:  # stopped even on failure; a missing binary fails the test
        try:
            yield Chain(Web3(HTTPProvider(anvil.url, request_kwargs={"timeout": 10})))
        finally:
            if GAS_SEEN:
                print("\nTaskSettlement gas:", json.dumps(GAS_SEEN, sort_keys=True))


# --- the rules in Python, as docs/evm-settlement.md states them ---


def py_prp(key: bytes, n: int, i: int) -> int:
    assert 0 <= i < n
    if n == 1:
        return 0
    bits = 2
    while (1 << bits) < n:
        bits += 2
    half = bits // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for t in range(4):
            digest = hashlib.sha256(key + bytes([t]) + right.to_bytes(4, "big")).digest()
            left, right = right, left ^ (int.from_bytes(digest, "big") & mask)
        x = (left << half) | right
        if x < n:
            return x


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def py_seed(task_id: str, r: int, submissions: list[str]) -> bytes:
    raw = task_id.encode()
    seed = sha(sha(b"tasknet-audit" + len(raw).to_bytes(4, "big") + raw) + r.to_bytes(8, "big"))
    for text in submissions:
        seed = sha(seed + sha(text.encode()))
    return seed


def py_leaf(account: str, amount: int) -> bytes:
    encoded = bytes(12) + bytes.fromhex(account[2:]) + amount.to_bytes(32, "big")
    return keccak(keccak(encoded))


class Ring:
    """Positions of a round's submitters (given in inclusion order)."""

    def __init__(self, seed: bytes, submitters: list[str], max_auditors: int) -> None:
        self.n = len(submitters)
        self.submitters = submitters
        self.k = min(max_auditors, self.n - 1)
        self.pos = {a: py_prp(seed, self.n, i) for i, a in enumerate(submitters)}
        self.at = {p: a for a, p in self.pos.items()}
        dseed = sha(seed + b"distribution")
        self.dist = {py_prp(dseed, self.n, i): a for i, a in enumerate(submitters)}

    def targets(self, auditor: str) -> list[str]:
        p = self.pos[auditor]
        return [self.at[(p - step) % self.n] for step in range(1, self.k + 1)]

    def auditors(self, target: str) -> list[str]:
        p = self.pos[target]
        return [self.at[(p + step) % self.n] for step in range(1, self.k + 1)]

    def distributor(self, attempt: int) -> str:
        return self.dist[attempt % self.n]


def config(start: int, **overrides: int) -> tuple[Any, ...]:
    values = {
        "roundTime": 10,
        "submissionWindow": 4,
        "auditWindow": 4,
        "minStake": 1_000_000,
        "bountyPerRound": 3_000_000,
        "startSlot": start,
        "allowedFailedDistributions": 1,
        "slashPpm": 700_000,
        "unstakeDelayRounds": 2,
        "maxAuditors": 5,
        "codeHash": keccak(b"the task's code"),
    }
    values.update(overrides)
    return tuple(values.values())


def distribution(entries: dict[str, int]) -> tuple[bytes, dict[str, list[bytes]]]:
    tree = MerkleTree([py_leaf(a, amount) for a, amount in entries.items()], h=keccak)
    return tree.root, {a: tree.proof(py_leaf(a, amount)) for a, amount in entries.items()}


# --- pure functions ---


def test_constants_and_deployment(chain: Chain) -> None:
    assert chain.fn.SETTLEMENT_ID().call() == keccak(b"tasknet.TaskSettlement.v1")
    assert chain.fn.slashedPool().call() == 0
    assert not chain.fn.taskExists("nope").call()


def test_prp_equals_python(chain: Chain) -> None:
    key = sha(b"a prp key")
    for n in (1, 2, 3, 4, 5, 17, 1000, 10000, 65537, 2**32 + 5, 2**62 + 1, 2**64):
        for i in sorted({0, n // 3, n // 2, n - 1, (7 * n) // 9}):
            assert chain.fn.prp(key, n, i).call() == py_prp(key, n, i), (n, i)
    # a permutation: every position exactly once
    for n in (3, 17):
        positions = [chain.fn.prp(keccak(b"x"), n, i).call() for i in range(n)]
        assert sorted(positions) == list(range(n))
        assert positions == [py_prp(keccak(b"x"), n, i) for i in range(n)]
    for n, i in ((0, 0), (5, 5), (2**64 + 1, 0)):
        with pytest.raises(ContractCustomError) as info:
            chain.fn.prp(key, n, i).call()
        assert _decode_refusal(bytes.fromhex(str(info.value.data)[2:])) == "malformed"


def test_merkle_equals_chain_merkle(chain: Chain) -> None:
    accounts = chain.accounts
    entries = {a.lower(): 1_000 * (i + 1) for i, a in enumerate(accounts[:7])}
    leaves = [py_leaf(a, amount) for a, amount in entries.items()]
    tree = MerkleTree(leaves, h=keccak)
    for (account, amount), leaf in zip(entries.items(), leaves, strict=True):
        assert chain.fn.leafOf(Web3.to_checksum_address(account), amount).call() == leaf
        proof = tree.proof(leaf)
        assert chain.fn.verifyProof(proof, tree.root, leaf).call()
        assert not chain.fn.verifyProof(proof, tree.root, py_leaf(account, amount + 1)).call()
        assert not chain.fn.verifyProof(proof[:-1], tree.root, leaf).call()
        assert not chain.fn.verifyProof(proof, bytes(32), leaf).call()
    lone = MerkleTree([leaves[0]], h=keccak)
    assert lone.root == leaves[0]
    assert chain.fn.verifyProof([], lone.root, leaves[0]).call()
    assert not chain.fn.verifyProof([], lone.root, leaves[1]).call()
    assert not chain.fn.verifyProof([], bytes(32), bytes(32)).call()  # root 0 never verifies


def test_bind_peer(chain: Chain) -> None:
    a = chain.accounts[8]
    slot = chain.now() + 1
    peer, signature = b"\x00\x24\x08\x01" + bytes(range(34)), bytes(range(64))
    receipt = chain.ok(chain.fn.bindPeer(peer, signature), a, slot, gas="bindPeer")
    assert chain.events(receipt) == [
        ("PeerBound", {"account": a, "peerId": peer, "signature": signature})
    ]
    assert chain.fn.peerOf(a).call() == [peer, signature]
    chain.ok(chain.fn.bindPeer(b"other", signature[::-1]), a, slot)  # replaces
    assert chain.fn.peerOf(a).call() == [b"other", signature[::-1]]
    for bad_peer, bad_signature in ((b"", signature), (bytes(65), signature), (peer, bytes(63))):
        assert chain.refused(chain.fn.bindPeer(bad_peer, bad_signature), a, slot) == "malformed"
    assert chain.fn.peerOf(chain.accounts[9]).call() == [b"", b""]


def test_create_task_refusals(chain: Chain) -> None:
    owner = chain.accounts[0]
    slot = chain.now() + 1
    create = chain.fn.createTask
    bad = [
        ("", "name", config(0)),
        ("x" * 65, "name", config(0)),
        ("t", "n" * 129, config(0)),
        ("t", "name", config(0, roundTime=0)),
        ("t", "name", config(0, submissionWindow=0)),
        ("t", "name", config(0, auditWindow=0)),
        ("t", "name", config(0, minStake=0)),
        ("t", "name", config(0, allowedFailedDistributions=65)),
        ("t", "name", config(0, slashPpm=1_000_001)),
        ("t", "name", config(0, maxAuditors=0)),
        ("t", "name", config(0, maxAuditors=65)),
        ("t", "name", config(0, submissionWindow=6, auditWindow=5)),
    ]
    for task_id, name, cfg in bad:
        assert chain.refused(create(task_id, name, cfg), owner, slot) == "bad_config", cfg
    # the limits themselves are accepted; startSlot 0 is the slot of the transaction
    edge = config(0, roundTime=9, submissionWindow=5, auditWindow=4, maxAuditors=64,
                  allowedFailedDistributions=64, slashPpm=1_000_000, bountyPerRound=0)  # fmt: skip
    receipt = chain.ok(create("e" * 64, "n" * 128, edge), owner, slot, gas="createTask")
    ((name, args),) = chain.events(receipt)
    assert name == "TaskCreated" and args["cfg"]["startSlot"] == slot
    assert args["taskKey"] == keccak(b"e" * 64) and args["owner"] == owner
    info = chain.fn.taskInfo("e" * 64).call()
    assert info[0][5] == slot and info[1] == owner and info[2] == 0
    raw = b"e" * 64
    assert info[3] == sha(b"tasknet-audit" + len(raw).to_bytes(4, "big") + raw)
    assert chain.refused(create("e" * 64, "again", config(0)), owner, slot) == "task_exists"
    assert chain.fn.taskExists("e" * 64).call()

    # the task field of every other call: malformed, then unknown
    fn = chain.fn
    for task_id, reason in (("", "malformed"), ("y" * 65, "malformed"), ("nope", "unknown_task")):
        calls = [
            (fn.fund(task_id), GWEI), (fn.stake(task_id), GWEI), (fn.unstake(task_id, 1), 0),
            (fn.submit(task_id, 0, "s"), 0), (fn.audit(task_id, 0, []), 0),
            (fn.submitDistribution(task_id, 0, bytes(32), 0, "cid"), 0),
            (fn.auditDistribution(task_id, 0), 0), (fn.payout(task_id, 0), 0),
            (fn.claim(task_id, 0, 1, []), 0),
        ]  # fmt: skip
        for call, value in calls:
            assert chain.refused(call, owner, slot, value) == reason, (call.fn_name, task_id)
    # amounts: whole gwei, at least 1, at most 2**64 - 1
    for value in (0, 1, GWEI + 1, GWEI // 2):
        assert chain.refused(fn.fund("e" * 64), owner, slot, value) == "bad_amount"
        assert chain.refused(fn.stake("e" * 64), owner, slot, value) == "bad_amount"
    assert chain.refused(fn.unstake("e" * 64, 0), owner, slot) == "bad_amount"


def _call_raw(
    chain: Chain, signature: str, types: list[str], args: list[Any], value: int = 0
) -> str:
    """eth_call with hand-encoded arguments (a `string` given as raw `bytes`): "ok" or the
    refusal."""
    data = keccak(text=signature)[:4] + encode(types, args)
    tx = {"from": chain.accounts[0], "to": chain.c.address, "data": data, "value": value}
    try:
        chain.w3.eth.call(tx)  # type: ignore[arg-type]
    except ContractCustomError as exc:
        return _decode_refusal(bytes.fromhex(str(exc.data)[2:]))
    return "ok"


def test_strings_must_be_utf8(chain: Chain) -> None:
    """Every string field is refused unless it is UTF-8 as Python decodes it (what makes a
    str): task ids and names bad_config at creation, task ids, submissions and cids malformed
    (before their size checks)."""
    slot = chain.now() + 1
    chain.ok(chain.fn.createTask("utf8", "utf8", config(0)), chain.accounts[0], slot)
    edge = [
        b"", b"plain", "h\u00e9llo".encode(), "\u65e5\u672c".encode(), "\U0001d11e".encode(),
        b"\x00", b"\x7f", b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xc2\x80", b"\xdf\xbf",
        b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xe0\xa0\x80", b"\xed\x9f\xbf", b"\xed\xa0\x80",
        b"\xee\x80\x80", b"\xef\xbf\xbf", b"\xf0\x8f\xbf\xbf", b"\xf0\x90\x80\x80",
        b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xe2\x82",
        b"\xe2\x82\xac", b"\xe2\x28\xa1", b"\xf0\x9d\x84", b"a" * 40 + b"\xff",
        b"a" * 31 + "\u00e9".encode(), b"a" * 32 + b"\xc3", b"\xc3" + b"a" * 40,
        "\u00e9".encode() * 30 + b"\x80",
    ]  # fmt: skip
    rng = random.Random(7)
    alphabet = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0,
                0xE1, 0xED, 0xEF, 0xF0, 0xF1, 0xF4, 0xF5, 0xFF]  # fmt: skip
    samples = edge + [
        bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 9))) for _ in range(150)
    ]
    for raw in samples:
        try:
            raw.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        got = _call_raw(chain, "submit(string,uint64,string)", ["string", "uint64", "bytes"],
                        ["utf8", 0, raw])  # fmt: skip
        assert (got != "malformed") == valid, (raw, got)
        if raw and len(raw) <= 64:
            got = _call_raw(chain, "fund(string)", ["bytes"], [raw], GWEI)
            assert got == ("unknown_task" if valid else "malformed"), (raw, got)
    cfg_types = "(uint64,uint64,uint64,uint64,uint64,uint64,uint8,uint32,uint64,uint8,bytes32)"
    for raw in edge:
        valid = raw == raw.decode("utf-8", "replace").encode()
        got = _call_raw(chain, f"createTask(string,string,{cfg_types})",
                        ["string", "bytes", cfg_types], ["named", raw, config(0)])  # fmt: skip
        assert got == ("ok" if valid else "bad_config"), (raw, got)
        got = _call_raw(
            chain, "submitDistribution(string,uint64,bytes32,uint64,string)",
            ["string", "uint64", "bytes32", "uint64", "bytes"], ["utf8", 0, bytes(32), 0, raw],
        )  # fmt: skip
        assert (got != "malformed") == valid, (raw, got)
    # the size checks count bytes, after the UTF-8 check
    big = "\u00e9".encode() * 256 + b"a"  # 513 bytes
    got = _call_raw(chain, "submit(string,uint64,string)", ["string", "uint64", "bytes"],
                    ["utf8", 0, big])  # fmt: skip
    assert got == "too_large"
    got = _call_raw(chain, "submit(string,uint64,string)", ["string", "uint64", "bytes"],
                    ["utf8", 0, big + b"\xff"])  # fmt: skip
    assert got == "malformed"


def test_honest_round_of_three(chain: Chain) -> None:
    """Create, fund, stake, submit, audit, distribute, pay out and claim, with the refusals
    met at each step."""
    fn, accounts = chain.fn, chain.accounts
    owner, a, b, c, outsider = accounts[0], accounts[1], accounts[2], accounts[3], accounts[4]
    task, min_stake, bounty = "honest-3", 1_000_000, 3_000_000
    start = chain.now() + 20
    slot = start - 10
    cfg = config(start, minStake=min_stake, bountyPerRound=bounty)
    chain.ok(fn.createTask(task, "hello", cfg), owner, slot)
    receipt = chain.ok(fn.fund(task), owner, slot, 10 * bounty * GWEI)
    assert chain.events(receipt) == [
        ("Funded", {"taskKey": keccak(task.encode()), "account": owner, "amount": 10 * bounty})
    ]
    for node in (a, b, c):
        chain.ok(fn.stake(task), node, slot, min_stake * GWEI, gas="stake")
    assert chain.fn.stakeOf(task, a).call() == min_stake
    assert chain.fn.poolOf(task).call() == 10 * bounty
    assert chain.refused(fn.submit(task, 0, "early"), a, slot) == "outside_window"

    # round 1's submission window: the work of round 0
    slot = start + 10
    assert chain.refused(fn.submit(task, 0, "x" * 513), a, slot) == "too_large"
    assert chain.refused(fn.submit(task, MAX_ROUND_FIELD + 1, "s"), a, slot) == "malformed"
    assert chain.refused(fn.submit(task, 1, "s"), a, slot) == "outside_window"
    assert chain.refused(fn.submit(task, 0, "s"), outsider, slot) == "not_staked"
    texts = {a: "proof of a", b: "proof of b " + "b" * 400, c: "proof of c"}
    for i, node in enumerate((a, b, c)):
        receipt = chain.ok(fn.submit(task, 0, texts[node]), node, slot,
                           gas="submit (first of a round)" if i == 0 else "submit")  # fmt: skip
        assert chain.events(receipt) == [
            ("Submitted", {"taskKey": keccak(task.encode()), "round": 0, "account": node,
                           "submission": texts[node]})
        ]  # fmt: skip
        assert fn.entryOf(task, 0, node).call()[:2] == [True, i]
    assert chain.refused(fn.submit(task, 0, "again"), a, slot) == "already_submitted"
    assert chain.refused(fn.audit(task, 0, []), a, slot) == "outside_window"
    seed = py_seed(task, 0, [texts[a], texts[b], texts[c]])
    assert fn.roundInfo(task, 0).call()[:3] == [seed, 3, 0]
    ring = Ring(seed, [a, b, c], 5)
    assert ring.k == 2

    # its audit window: nobody finds anything invalid
    slot = start + 14
    assert chain.refused(fn.audit(task, 0, [a]), a, slot) == "not_auditor"  # itself
    assert chain.refused(fn.audit(task, 0, [outsider]), a, slot) == "not_auditor"
    assert chain.refused(fn.audit(task, 0, [b]), outsider, slot) == "not_auditor"
    assert chain.refused(fn.audit(task, 0, [b, b]), a, slot) == "malformed"
    assert chain.refused(fn.audit(task, 0, accounts[1:7]), a, slot) == "malformed"
    for node in (a, b, c):
        chain.ok(fn.audit(task, 0, []), node, slot, gas="audit (no targets)")
    assert chain.refused(fn.audit(task, 0, []), a, slot) == "already_voted"
    assert chain.refused(fn.unstake(task, 1), a, slot) == "stake_locked"
    slot = start + 18  # idle
    assert chain.refused(fn.submitDistribution(task, 0, bytes(32), 0, "c"), a, slot) == (
        "outside_window"
    )

    # round 2's submission window: attempt 0 of the distribution
    slot = start + 20
    distributor = ring.distributor(0)
    others = [node for node in (a, b, c) if node != distributor]
    amounts = {a: 1_000_000, b: 1_200_000, c: 800_000}
    root, proofs = distribution({node.lower(): amount for node, amount in amounts.items()})
    send = fn.submitDistribution
    assert chain.refused(fn.payout(task, 0), owner, slot) == "no_distribution"
    assert chain.refused(send(task, 0, root, bounty, "cid"), others[0], slot) == "not_distributor"
    assert chain.refused(send(task, 0, root, bounty, "cid"), outsider, slot) == "not_distributor"
    assert chain.refused(send(task, 0, root, bounty + 1, "cid"), distributor, slot) == (
        "over_bounty"
    )
    assert chain.refused(send(task, 0, root, bounty, "c" * 257), distributor, slot) == "too_large"
    receipt = chain.ok(send(task, 0, root, bounty, "cid-0"), distributor, slot,
                       gas="submitDistribution")  # fmt: skip
    assert chain.events(receipt) == [
        ("DistributionSubmitted", {"taskKey": keccak(task.encode()), "round": 0,
         "distributor": distributor, "attempt": 0, "root": root, "total": bounty,
         "cid": "cid-0"})
    ]  # fmt: skip
    assert chain.refused(send(task, 0, root, bounty, "cid"), distributor, slot) == (
        "distribution_exists"
    )
    assert chain.refused(fn.payout(task, 0), owner, slot) == "not_ready"
    assert chain.refused(fn.claim(task, 0, amounts[a], proofs[a.lower()]), a, slot) == "not_ready"
    assert chain.refused(fn.auditDistribution(task, 0), others[0], slot) == "outside_window"

    # its audit window: the distributor may not vote, nor an outsider; nobody objects
    slot = start + 24
    assert chain.refused(fn.auditDistribution(task, 0), distributor, slot) == "not_auditor"
    assert chain.refused(fn.auditDistribution(task, 0), outsider, slot) == "not_auditor"
    assert chain.refused(fn.unstake(task, 1), a, slot) == "stake_locked"  # round 2 < 1 + 2
    assert chain.refused(fn.payout(task, 0), owner, slot) == "not_ready"

    # after it: anyone pays out
    slot = start + 28
    receipt = chain.ok(fn.payout(task, 0), owner, slot, gas="payout")
    assert chain.events(receipt) == [
        ("PaidOut", {"taskKey": keccak(task.encode()), "round": 0, "payer": owner,
                     "attempt": 0, "total": bounty})
    ]  # fmt: skip
    assert chain.refused(fn.payout(task, 0), owner, slot) == "already_paid"
    assert fn.poolOf(task).call() == 9 * bounty
    assert fn.roundInfo(task, 0).call()[3:] == [1, True, 0, bounty]

    # round 3: attempt 1 has nothing to do; claims
    slot = start + 30
    assert chain.refused(send(task, 0, root, bounty, "cid"), ring.distributor(1), slot) == (
        "distribution_exists"
    )
    assert chain.refused(send(task, 1, root, bounty, "cid"), distributor, slot) == (
        "not_distributor"  # attempt 0 of round 1: nobody submitted for it
    )
    claim = fn.claim
    proof_a = proofs[a.lower()]
    assert chain.refused(claim(task, 0, amounts[a], proof_a), outsider, slot) == "bad_proof"
    assert chain.refused(claim(task, 0, amounts[a] + 1, proof_a), a, slot) == "bad_proof"
    assert chain.refused(claim(task, 0, amounts[a], proofs[b.lower()]), a, slot) == "bad_proof"
    assert chain.refused(claim(task, 0, 0, proof_a), a, slot) == "bad_amount"
    assert chain.refused(claim(task, 0, amounts[a], [bytes(32)] * 65), a, slot) == "malformed"
    assert chain.refused(claim(task, 1, amounts[a], proof_a), a, slot) == "no_distribution"
    for node in (a, b, c):
        before = chain.w3.eth.get_balance(node)
        receipt = chain.ok(claim(task, 0, amounts[node], proofs[node.lower()]), node, slot,
                           gas="claim")  # fmt: skip
        assert chain.events(receipt) == [
            ("Claimed", {"taskKey": keccak(task.encode()), "round": 0, "account": node,
                         "amount": amounts[node]})
        ]  # fmt: skip
        after = chain.w3.eth.get_balance(node)
        assert after - before == amounts[node] * GWEI - chain.paid_wei(receipt)
    assert chain.refused(claim(task, 0, amounts[a], proof_a), a, slot) == "already_claimed"
    assert fn.roundInfo(task, 0).call()[6] == 0  # claimable

    # unstake: from round 1 + 2 = 3, the pending round settled without a slash
    assert chain.refused(fn.unstake(task, min_stake + 1), a, slot) == "insufficient_balance"
    before = chain.w3.eth.get_balance(a)
    receipt = chain.ok(fn.unstake(task, min_stake), a, slot, gas="unstake")
    assert [name for name, _ in chain.events(receipt)] == ["Unstaked"]
    after = chain.w3.eth.get_balance(a)
    assert after - before == min_stake * GWEI - chain.paid_wei(receipt)
    assert fn.stakeOf(task, a).call() == 0
    assert fn.accountInfo(task, a).call() == [0, False, 0, 1]
    assert fn.slashedPool().call() == 0


def test_rejection_slash_and_failed_attempts(chain: Chain) -> None:
    """7 submitters, k = 5. One is rejected by 3 of its 5 auditors (one auditor names all 5 of
    its targets); attempt 0's list is voted down; the rejected submitter is attempt 1's
    distributor and may not send it; attempt 2 is accepted. The slash is taken when the
    rejected account next acts."""
    fn, accounts = chain.fn, chain.accounts
    owner, nodes, outsider = accounts[0], accounts[1:8], accounts[8]
    task, stake, bounty, pool = "rejecting-7", 2_000_000, 7_000_000, 5_000_000
    start = chain.now() + 10
    cfg = config(start, minStake=1_000_000, bountyPerRound=bounty, allowedFailedDistributions=2,
                 slashPpm=500_000, unstakeDelayRounds=0)  # fmt: skip
    slot = start - 5
    chain.ok(fn.createTask(task, "rejecting", cfg), owner, slot)
    chain.ok(fn.fund(task), owner, slot, pool * GWEI)
    for node in nodes:
        chain.ok(fn.stake(task), node, slot, stake * GWEI)

    slot = start + 10
    for i, node in enumerate(nodes):
        chain.ok(fn.submit(task, 0, f"work {i}"), node, slot)
    seed = py_seed(task, 0, [f"work {i}" for i in range(7)])
    ring = Ring(seed, list(nodes), 5)
    assert ring.k == 5 and fn.roundInfo(task, 0).call()[0] == seed
    cheat = ring.distributor(1)  # rejected below, so attempt 1 cannot be sent
    x, y, z = ring.auditors(cheat)[:3]

    slot = start + 14
    assert chain.refused(fn.unstake(task, 1), cheat, slot) == "stake_locked"  # pending round
    not_mine = [t for t in nodes if t not in ring.targets(x) and t != x][0]
    assert chain.refused(fn.audit(task, 0, [cheat, not_mine]), x, slot) == "not_auditor"
    receipt = chain.ok(fn.audit(task, 0, ring.targets(x)), x, slot, gas="audit (5 targets)")
    assert chain.events(receipt) == [
        ("Audited", {"taskKey": keccak(task.encode()), "round": 0, "auditor": x,
                     "invalid": ring.targets(x)})
    ]  # fmt: skip
    assert fn.roundInfo(task, 0).call()[2] == 0
    chain.ok(fn.audit(task, 0, [cheat]), y, slot)
    assert fn.roundInfo(task, 0).call()[2] == 0  # 2 votes: 2 * 2 > 5 is false
    chain.ok(fn.audit(task, 0, [cheat]), z, slot)
    assert fn.roundInfo(task, 0).call()[2] == 1  # R: 2 * 3 > 5
    assert fn.entryOf(task, 0, cheat).call()[2] == 3

    # attempt 0: the list is voted down by 3 of the 5 voters (n - R - 1)
    slot = start + 20
    d0 = ring.distributor(0)
    accepted = [node for node in nodes if node != cheat]
    root0, _ = distribution({node.lower(): 1_000_000 for node in accepted[:5]})
    send = fn.submitDistribution
    assert chain.refused(send(task, 0, root0, 6_000_000, "l0"), d0, slot) == (
        "insufficient_balance"  # 6M <= bounty but > pool
    )
    chain.ok(send(task, 0, root0, pool, "l0"), d0, slot)
    slot = start + 24
    assert chain.refused(fn.auditDistribution(task, 0), cheat, slot) == "slashed"
    voters = [node for node in accepted if node != d0]
    for i, voter in enumerate(voters[:3]):
        receipt = chain.ok(fn.auditDistribution(task, 0), voter, slot,
                           gas="auditDistribution" if i == 0 else "")  # fmt: skip
        assert chain.events(receipt) == [
            ("DistributionVoted", {"taskKey": keccak(task.encode()), "round": 0,
                                   "voter": voter, "attempt": 0})
        ]  # fmt: skip
    assert chain.refused(fn.auditDistribution(task, 0), voters[0], slot) == "already_voted"
    slot = start + 28
    assert chain.refused(fn.payout(task, 0), owner, slot) == "no_distribution"

    # attempt 1 is the rejected submitter's: refused, and it passes unsent
    slot = start + 30
    root, proofs = distribution({node.lower(): 1_000_000 for node in accepted})  # 6M > total
    assert chain.refused(send(task, 0, root, pool, "l1"), cheat, slot) == "slashed"
    others = [node for node in nodes if node != cheat]
    assert chain.refused(send(task, 0, root, pool, "l1"), others[0], slot) == "not_distributor"
    slot = start + 34
    assert chain.refused(fn.auditDistribution(task, 0), voters[0], slot) == "no_distribution"

    # attempt 2 is accepted
    slot = start + 40
    d2 = ring.distributor(2)
    assert d2 != cheat
    chain.ok(send(task, 0, root, pool, "l2"), d2, slot)
    slot = start + 44
    assert chain.refused(fn.payout(task, 0), owner, slot) == "not_ready"
    slot = start + 48
    chain.ok(fn.payout(task, 0), outsider, slot)  # anyone
    assert fn.roundInfo(task, 0).call()[3:] == [3, True, 2, pool]
    assert fn.poolOf(task).call() == 0

    slot = start + 50
    proof = proofs[cheat.lower()] if cheat.lower() in proofs else []
    assert chain.refused(fn.claim(task, 0, 1_000_000, proof), cheat, slot) == "slashed"
    for node in accepted[:5]:
        chain.ok(fn.claim(task, 0, 1_000_000, proofs[node.lower()]), node, slot)
    last = accepted[5]
    assert chain.refused(fn.claim(task, 0, 1_000_000, proofs[last.lower()]), last, slot) == (
        "over_bounty"  # the list adds up to more than its total
    )

    # the slash is taken at the cheat's next stake: Slashed, then the main event
    assert fn.stakeOf(task, cheat).call() == stake
    receipt = chain.ok(fn.stake(task), cheat, slot, GWEI)
    key = keccak(task.encode())
    assert chain.events(receipt) == [
        ("Slashed", {"taskKey": key, "round": 0, "account": cheat, "amount": stake // 2}),
        ("Staked", {"taskKey": key, "account": cheat, "amount": 1}),
    ]
    assert fn.stakeOf(task, cheat).call() == stake // 2 + 1
    assert fn.slashedPool().call() == stake // 2
    assert fn.accountInfo(task, cheat).call() == [stake // 2 + 1, False, 0, 1]
    # an accepted submitter's settlement takes nothing
    receipt = chain.ok(fn.unstake(task, stake), x, slot)
    assert [name for name, _ in chain.events(receipt)] == ["Unstaked"]
    assert fn.stakeOf(task, x).call() == 0


def test_lone_submitter_and_an_emptied_pool(chain: Chain) -> None:
    """n = 1: k = 0 (nothing can reject it, it audits nobody), it distributes every attempt
    and nobody votes on its lists. Two rounds' lists fit the pool each, not together: the
    second payout finds the pool emptied by the first."""
    fn, owner, node = chain.fn, chain.accounts[0], chain.accounts[9]
    task, bounty = "lone", 4_000_000
    start = chain.now() + 10
    chain.ok(fn.createTask(task, "lone", config(start, bountyPerRound=bounty)), owner, start - 5)
    chain.ok(fn.fund(task), owner, start - 5, bounty * GWEI)
    chain.ok(fn.stake(task), node, start - 5, 1_000_000 * GWEI)
    root, proofs = distribution({node.lower(): bounty})
    chain.ok(fn.submit(task, 0, "w0"), node, start + 10)
    assert chain.refused(fn.audit(task, 0, [node]), node, start + 14) == "not_auditor"
    chain.ok(fn.audit(task, 0, []), node, start + 14)
    receipt = chain.ok(fn.submit(task, 1, "w1"), node, start + 20)  # settles round 0: no cut
    assert [name for name, _ in chain.events(receipt)] == ["Submitted"]
    assert fn.accountInfo(task, node).call() == [1_000_000, True, 1, 2]
    chain.ok(fn.submitDistribution(task, 0, root, bounty, "r0"), node, start + 20)
    assert chain.refused(fn.auditDistribution(task, 0), node, start + 24) == "not_auditor"
    chain.ok(fn.submitDistribution(task, 1, root, bounty, "r1"), node, start + 30)  # pool: 4M
    chain.ok(fn.payout(task, 0), owner, start + 30)
    assert fn.poolOf(task).call() == 0
    assert chain.refused(fn.payout(task, 1), owner, start + 38) == "insufficient_balance"
    chain.ok(fn.claim(task, 0, bounty, proofs[node.lower()]), node, start + 38)
    chain.ok(fn.fund(task), owner, start + 38, bounty * GWEI)
    chain.ok(fn.payout(task, 1), owner, start + 38)
    chain.ok(fn.claim(task, 1, bounty, proofs[node.lower()]), node, start + 38)
    assert fn.roundInfo(task, 1).call()[3:] == [1, True, 0, 0]


def test_audit_list_duplicates(chain: Chain) -> None:
    """An audit list naming an account twice is malformed wherever the two are, also among
    addresses that share the low bits the contract's filter hashes (checked before the
    window: a list without duplicates meets outside_window here)."""
    slot = chain.now() + 1
    chain.ok(
        chain.fn.createTask("dups", "dups", config(0, maxAuditors=64)), chain.accounts[0], slot
    )
    same_low_bits = [Web3.to_checksum_address(f"0x{i:030x}{0x3A7:010x}") for i in range(1, 40)]
    spread = [Web3.to_checksum_address("0x" + keccak(bytes([i])).hex()[:40]) for i in range(64)]
    cases = [
        (same_low_bits, "outside_window"),
        (spread, "outside_window"),
        (same_low_bits + same_low_bits[5:6], "malformed"),
        (same_low_bits[:1] * 2, "malformed"),
        (spread[:10] + spread[3:4] + spread[10:20], "malformed"),
        (spread[:63] + spread[62:63], "malformed"),
        (spread + spread[:1], "malformed"),  # 65 > maxAuditors
    ]
    for invalid, reason in cases:
        got = _call_raw(
            chain, "audit(string,uint64,address[])", ["string", "uint64", "address[]"],
            ["dups", 0, invalid],
        )  # fmt: skip
        assert got == reason, (len(invalid), got)


def test_a_round_at_k_64(chain: Chain) -> None:
    """65 submitters, max_auditors 64: one auditor names all 64 of its targets; claims carry
    proofs of a 65-leaf list. Gas is printed; the audit's cost is linear in its targets."""
    fn, owner, w3 = chain.fn, chain.accounts[0], chain.w3
    nodes = [Web3.to_checksum_address("0x" + keccak(b"node%d" % i).hex()[:40]) for i in range(65)]
    for node in nodes:
        w3.provider.make_request("anvil_impersonateAccount", [node])
        w3.provider.make_request("anvil_setBalance", [node, hex(10**20)])
    task, start = "k64", chain.now() + 10
    cfg = config(start, maxAuditors=64, bountyPerRound=65_000_000, roundTime=20,
                 submissionWindow=8, auditWindow=8)  # fmt: skip
    chain.ok(fn.createTask(task, "k64", cfg), owner, start - 5)
    chain.ok(fn.fund(task), owner, start - 5, 65_000_000 * GWEI)
    for node in nodes:
        chain.ok(fn.stake(task), node, start - 5, 1_000_000 * GWEI)
    for i, node in enumerate(nodes):
        chain.ok(fn.submit(task, 0, f"work {i}"), node, start + 20)
    ring = Ring(py_seed(task, 0, [f"work {i}" for i in range(65)]), nodes, 64)
    assert ring.k == 64
    auditor = nodes[7]
    targets = ring.targets(auditor)
    chain.ok(fn.audit(task, 0, targets[:5]), nodes[8], start + 28, gas="audit k=64 (5 targets)")
    chain.ok(fn.audit(task, 0, targets), auditor, start + 28, gas="audit k=64 (64 targets)")
    assert all(fn.entryOf(task, 0, t).call()[2] == 2 for t in targets[:5])  # both auditors
    root, proofs = distribution({node.lower(): 1_000_000 for node in nodes})
    chain.ok(fn.submitDistribution(task, 0, root, 65_000_000, "l"), ring.distributor(0),
             start + 40, gas="submitDistribution (n=65)")  # fmt: skip
    chain.ok(fn.payout(task, 0), owner, start + 56)
    for node in nodes[:2]:
        chain.ok(fn.claim(task, 0, 1_000_000, proofs[node.lower()]), node, start + 56,
                 gas="claim (65 leaves)")  # fmt: skip
    for node in nodes:
        w3.provider.make_request("anvil_stopImpersonatingAccount", [node])
