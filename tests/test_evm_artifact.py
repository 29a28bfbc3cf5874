# The committed TaskSettlement artifact (chain/evm/TaskSettlement.json) is what
# chain/evm/TaskSettlement.sol compiles to with the pinned solc (`node chain/evm/compile.js
# --check`), and its ABI is the interface the Python adapter is written against: the functions,
# events and the `Refused(uint8)` error of docs/evm-settlement.md.
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVM = ROOT / "chain" / "evm"
ARTIFACT = EVM / "TaskSettlement.json"
SOURCE = EVM / "TaskSettlement.sol"

CONFIG = "(uint64,uint64,uint64,uint64,uint64,uint64,uint8,uint32,uint64,uint8,bytes32)"
FUNCTIONS = {
    # name: (inputs, outputs, stateMutability)
    "createTask": (f"string,string,{CONFIG}", "", "nonpayable"),
    "fund": ("string", "", "payable"),
    "stake": ("string", "", "payable"),
    "unstake": ("string,uint64", "", "nonpayable"),
    "submit": ("string,uint64,string", "", "nonpayable"),
    "audit": ("string,uint64,address[]", "", "nonpayable"),
    "submitDistribution": ("string,uint64,bytes32,uint64,string", "", "nonpayable"),
    "auditDistribution": ("string,uint64", "", "nonpayable"),
    "payout": ("string,uint64", "", "nonpayable"),
    "claim": ("string,uint64,uint64,bytes32[]", "", "nonpayable"),
    "bindPeer": ("bytes,bytes", "", "nonpayable"),
    "peerOf": ("address", "bytes,bytes", "view"),
    "prp": ("bytes32,uint256,uint256", "uint256", "pure"),
    "leafOf": ("address,uint256", "bytes32", "pure"),
    "verifyProof": ("bytes32[],bytes32,bytes32", "bool", "pure"),
    "taskExists": ("string", "bool", "view"),
    "stakeOf": ("string,address", "uint64", "view"),
    "poolOf": ("string", "uint64", "view"),
    "slashedPool": ("", "uint64", "view"),
    "SETTLEMENT_ID": ("", "bytes32", "view"),
}
EVENTS = {
    # name: [(type, indexed), ...]
    "TaskCreated": [
        ("bytes32", True), ("string", False), ("string", False), ("address", True), (CONFIG, False)
    ],
    "Funded": [("bytes32", True), ("address", True), ("uint64", False)],
    "Staked": [("bytes32", True), ("address", True), ("uint64", False)],
    "Unstaked": [("bytes32", True), ("address", True), ("uint64", False)],
    "Submitted": [("bytes32", True), ("uint64", True), ("address", True), ("string", False)],
    "Audited": [("bytes32", True), ("uint64", True), ("address", True), ("address[]", False)],
    "DistributionSubmitted": [
        ("bytes32", True), ("uint64", True), ("address", True), ("uint8", False),
        ("bytes32", False), ("uint64", False), ("string", False),
    ],
    "DistributionVoted": [("bytes32", True), ("uint64", True), ("address", True), ("uint8", False)],
    "PaidOut": [
        ("bytes32", True), ("uint64", True), ("address", True), ("uint8", False), ("uint64", False)
    ],
    "Claimed": [("bytes32", True), ("uint64", True), ("address", True), ("uint64", False)],
    "Slashed": [("bytes32", True), ("uint64", True), ("address", True), ("uint64", False)],
    "PeerBound": [("address", True), ("bytes", False), ("bytes", False)],
}  # fmt: skip


def _type(param: dict) -> str:
    if param["type"] == "tuple":
        return "(" + ",".join(_type(c) for c in param["components"]) + ")"
    return param["type"]


def _types(params: list[dict]) -> str:
    return ",".join(_type(p) for p in params)


def _artifact() -> dict:
    return json.loads(ARTIFACT.read_text())


def test_artifact_is_what_the_source_compiles_to() -> None:
    node = shutil.which("node")
    solc = EVM / "node_modules" / "solc" / "package.json"
    if node is None or not solc.exists():
        pytest.fail(
            f"node ({node or 'not on PATH'}) and {solc.parent} are needed to check the "
            "TaskSettlement artifact: run `bash scripts/setup`"
        )
    done = subprocess.run(
        [node, str(EVM / "compile.js"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"compile.js --check failed:\n{done.stdout}{done.stderr}"


def test_artifact_fields() -> None:
    art = _artifact()
    assert set(art) == {
        "contractName", "compiler", "settings", "sourceSha256", "abi", "bytecode",
        "deployedBytecode",
    }  # fmt: skip
    assert art["contractName"] == "TaskSettlement"
    assert art["compiler"].startswith("0.8.30+")
    assert art["settings"]["evmVersion"] == "cancun"
    assert art["settings"]["optimizer"] == {"enabled": True, "runs": 200}
    assert art["sourceSha256"] == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    for key in ("bytecode", "deployedBytecode"):
        code = art[key]
        assert code.startswith("0x") and len(code) > 2 and len(code) % 2 == 0
        bytes.fromhex(code[2:])
    assert (len(art["deployedBytecode"]) - 2) // 2 <= 24576  # EIP-170
    text = ARTIFACT.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(art, indent=2, sort_keys=True) + "\n"


def test_abi_is_the_adapter_interface() -> None:
    abi = _artifact()["abi"]
    functions = {e["name"]: e for e in abi if e["type"] == "function"}
    for name, (inputs, outputs, mutability) in FUNCTIONS.items():
        assert name in functions, f"function {name} is missing"
        entry = functions[name]
        assert _types(entry["inputs"]) == inputs, name
        assert _types(entry["outputs"]) == outputs, name
        assert entry["stateMutability"] == mutability, name
    create = functions["createTask"]["inputs"][2]
    assert [c["name"] for c in create["components"]] == [
        "roundTime", "submissionWindow", "auditWindow", "minStake", "bountyPerRound",
        "startSlot", "allowedFailedDistributions", "slashPpm", "unstakeDelayRounds",
        "maxAuditors", "codeHash",
    ]  # fmt: skip

    events = {e["name"]: e for e in abi if e["type"] == "event"}
    assert set(events) == set(EVENTS)
    for name, params in EVENTS.items():
        got = [(_type(p), p["indexed"]) for p in events[name]["inputs"]]
        assert got == params, name
        assert not events[name]["anonymous"], name

    errors = {e["name"]: e for e in abi if e["type"] == "error"}
    assert _types(errors["Refused"]["inputs"]) == "uint8"
    assert not any(e["type"] in ("fallback", "receive") for e in abi)  # no stray ether
