# The EVM plumbing under the EVM adapter, on real anvil processes: chain/evm/anvil.py (start,
# side by side, a taken port, a dying anvil, a state file, nothing left running), wallet.py
# (wallet.key created 0600, reused, refused when readable by others or corrupt and never
# overwritten; the peer binding), client.py (funding a fresh wallet, nonces over 20 sends in a
# row and after another sender used the key, refusals at estimation and on chain decoded from
# `Refused(uint8)`, a dead or silent node raising ChainUnavailable quickly, a transaction with
# no receipt in time kept by hash and found later, events, revert data by hand).
# The contract used here is a hand-assembled one (poke(code): codes < 256 revert with
# Refused(code), larger ones emit Poked(code)), so this file does not need TaskSettlement.
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import eth_abi
import pytest
from eth_utils import keccak

import chain.evm.anvil as anvil_module
from chain.adapter import ChainError, ChainUnavailable
from chain.evm.anvil import Anvil, AnvilError, dev_keys, find_anvil
from chain.evm.client import (
    ERROR_SELECTOR,
    PANIC_SELECTOR,
    REFUSED_SELECTOR,
    EvmClient,
    RpcError,
    TxUnconfirmed,
    decode_revert,
    describe_revert,
)
from chain.evm.wallet import (
    WALLET_FILE_NAME,
    EvmWallet,
    WalletError,
    binding_message,
    load_or_create_wallet,
    sign_binding,
    verify_binding,
)
from chain.rules import REASON_CODES, Refused
from p2p.identity import Identity

ETH = 10**18
POKED_TOPIC = keccak(b"Poked(uint256)")
POKE_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "poke",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "code", "type": "uint256"}],
        "outputs": [],
    },
    {
        "type": "event",
        "name": "Poked",
        "anonymous": False,
        "inputs": [{"name": "code", "type": "uint256", "indexed": False}],
    },
]


def _poke_init_code() -> bytes:
    """Creation code of a contract whose every call reads code = calldata[4:36] and either
    reverts with Refused(code) (code < 256) or emits Poked(code)."""
    runtime = (
        bytes.fromhex("600435")  # PUSH1 4 CALLDATALOAD            -> code
        + bytes.fromhex("60ff8111601d57")  # PUSH1 ff DUP2 GT PUSH1 29 JUMPI: code > 255?
        + b"\x63" + REFUSED_SELECTOR  # PUSH4 selector
        + bytes.fromhex("60e01b600052")  # PUSH1 224 SHL PUSH1 0 MSTORE: selector at 0..3
        + bytes.fromhex("600452")  # PUSH1 4 MSTORE: code at 4..35
        + bytes.fromhex("60246000fd")  # PUSH1 36 PUSH1 0 REVERT
        + bytes.fromhex("5b600052")  # 29: JUMPDEST PUSH1 0 MSTORE: code at 0..31
        + b"\x7f" + POKED_TOPIC  # PUSH32 topic
        + bytes.fromhex("60206000a100")  # PUSH1 32 PUSH1 0 LOG1 STOP
    )  # fmt: skip
    assert runtime[29] == 0x5B
    n = len(runtime)
    # PUSH1 n PUSH1 12 PUSH1 0 CODECOPY PUSH1 n PUSH1 0 RETURN, then the runtime
    return bytes([0x60, n, 0x60, 12, 0x60, 0, 0x39, 0x60, n, 0x60, 0, 0xF3]) + runtime


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    node = Anvil()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def funder(anvil: Anvil) -> Iterator[EvmClient]:
    client = EvmClient(anvil.url, EvmWallet(anvil.dev_keys[0]), timeout=5.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def poke_address(funder: EvmClient) -> str:
    return funder.deploy({"bytecode": {"object": _poke_init_code().hex()}})


def _funded_client(anvil: Anvil, funder: EvmClient, **kwargs: Any) -> EvmClient:
    wallet = EvmWallet.generate()
    funder.send_value(wallet.address, 10 * ETH)
    return EvmClient(anvil.url, wallet, timeout=5.0, **kwargs)


def _pgrep(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


# --- anvil ------------------------------------------------------------------------------------


def test_anvil_answers_with_its_dev_accounts(anvil: Anvil, funder: EvmClient) -> None:
    assert anvil.running and anvil.url == f"http://127.0.0.1:{anvil.port}"
    assert funder.chain_id == 31337
    assert funder.block_number() >= 0
    accounts = funder._request("eth_accounts", [])
    assert accounts == [EvmWallet(k).address for k in anvil.dev_keys]
    assert funder.balance(accounts[9]) >= 9_000 * ETH
    assert dev_keys(2) == anvil.dev_keys[:2]


def test_two_anvils_side_by_side_then_stopped(anvil: Anvil) -> None:
    with Anvil(chain_id=4242, accounts=2) as other:
        assert other.port != anvil.port
        with EvmClient(other.url, EvmWallet(other.dev_keys[0])) as client:
            assert client.chain_id == 4242
            assert len(client._request("eth_accounts", [])) == 2
        pid = other.pid
    assert not other.running
    assert pid not in _pgrep("anvil")
    other.stop()  # idempotent
    with pytest.raises(AnvilError):
        other.url  # noqa: B018


def test_a_port_taken_after_the_check_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken])
        original = anvil_module._candidate_port
        monkeypatch.setattr(
            anvil_module, "_candidate_port", lambda rng: next(ports, None) or original(rng)
        )
        with Anvil() as node:
            assert node.port != taken
            assert node.running


def test_an_anvil_that_dies_says_why() -> None:
    node = Anvil(extra_args=["--no-such-option"])
    started = time.monotonic()
    with pytest.raises(AnvilError, match="no-such-option"):
        node.start()
    assert time.monotonic() - started < 5
    assert not node.running


def test_missing_binary_says_run_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(anvil_module, "EVM_DIR", tmp_path)
    with pytest.raises(AnvilError, match=r"run bash scripts/setup \(npm ci --prefix chain/evm\)"):
        find_anvil()


def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    someone = EvmWallet.generate().address
    with Anvil(state_path=state, state_interval=60) as node:
        with EvmClient(node.url, EvmWallet(node.dev_keys[0])) as client:
            client.send_value(someone, 12345)
    assert state.exists()
    with Anvil(state_path=state) as node:
        with EvmClient(node.url, EvmWallet(node.dev_keys[0])) as client:
            assert client.balance(someone) == 12345


# --- wallet -----------------------------------------------------------------------------------


def test_wallet_key_created_0600_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "node"
    wallet = load_or_create_wallet(data)
    path = data / WALLET_FILE_NAME
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert wallet.address.startswith("0x") and len(wallet.address) == 42
    assert wallet.address == wallet.address.lower()
    assert load_or_create_wallet(data) == wallet
    assert wallet.key_bytes.hex() not in repr(wallet)
    assert [p.name for p in data.iterdir()] == [WALLET_FILE_NAME]  # no temporary left


def test_wallet_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_wallet(tmp_path)
    path = tmp_path / WALLET_FILE_NAME
    before = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(WalletError, match="chmod 600"):
        load_or_create_wallet(tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        "tasknet-secp256k1-key-v1\nnot-hex\n",
        "tasknet-secp256k1-key-v1\n" + "00" * 32 + "\n",  # zero is not a key
        "tasknet-secp256k1-key-v1\n" + "11" * 31 + "\n",
        "tasknet-ed25519-seed-v1\n" + "11" * 32 + "\n",  # a node.key
        "",
    ],
)
def test_corrupt_wallet_key_is_refused_not_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / WALLET_FILE_NAME
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(WalletError) as info:
        load_or_create_wallet(tmp_path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert path.read_text() == content


def test_binding_verifies_only_what_was_signed() -> None:
    identity = Identity.generate()
    peer = identity.peer_id.to_base58()
    contract = EvmWallet.generate().address
    address = EvmWallet.generate().address
    signature = sign_binding(identity, 31337, contract, address)
    assert verify_binding(peer, signature, 31337, contract, address)
    assert verify_binding(peer, signature, 31337, contract.upper().replace("0X", "0x"), address)
    assert not verify_binding(peer, signature, 1, contract, address)
    assert not verify_binding(peer, signature, 31337, address, address)
    assert not verify_binding(peer, signature, 31337, contract, EvmWallet.generate().address)
    other = Identity.generate().peer_id.to_base58()
    assert not verify_binding(other, signature, 31337, contract, address)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_binding(peer, flipped, 31337, contract, address)
    assert not verify_binding("not-a-peer-id", signature, 31337, contract, address)
    assert not verify_binding(peer, signature, 31337, "0x1234", address)
    message = binding_message(31337, contract, address, peer)
    assert message.startswith(b"tasknet-evm-binding-v1\x00" + (31337).to_bytes(8, "big"))


# --- client -----------------------------------------------------------------------------------


def test_fund_a_fresh_wallet_and_keep_nonces_right(anvil: Anvil, funder: EvmClient) -> None:
    client = _funded_client(anvil, funder)
    assert client.balance(client.address) == 10 * ETH
    sink = EvmWallet.generate().address
    blocks = [client.send_value(sink, i + 1).block_number for i in range(20)]
    assert len(set(blocks)) == 20 and blocks == sorted(blocks)
    assert client.nonce_of(client.address) == 20
    assert client.balance(sink) == sum(range(1, 21))
    # another sender with the same key (another process, say) takes nonce 20
    with EvmClient(anvil.url, client.wallet) as twin:
        twin.send_value(sink, 1000)
    receipt = client.send_value(sink, 5)  # its local nonce 20 is refused: resynchronised
    assert client.nonce_of(client.address) == 22
    assert client.receipt_of(receipt.tx_hash) == receipt
    assert client.balance(sink) == sum(range(1, 21)) + 1005
    # sends from several threads at once are numbered one at a time
    with ThreadPoolExecutor(4) as pool:
        receipts = list(pool.map(lambda i: client.send_value(sink, 1), range(12)))
    assert len({r.tx_hash for r in receipts}) == 12
    assert client.nonce_of(client.address) == 34
    client.close()


def test_refusals_at_estimation_and_on_chain(
    anvil: Anvil, funder: EvmClient, poke_address: str
) -> None:
    client = _funded_client(anvil, funder)
    client.use_contract(poke_address, POKE_ABI)
    for code, reason in enumerate(REASON_CODES):
        with pytest.raises(Refused) as info:
            client.send("poke", code)
        assert info.value.reason == reason and "not sent" in info.value.detail
    assert client.nonce_of(client.address) == 0  # nothing was sent
    # with the gas given there is no estimation: the transaction is included and reverts
    with pytest.raises(Refused) as info:
        client.send("poke", 6, gas=100_000)
    assert info.value.reason == "outside_window" and "included in block" in info.value.detail
    assert client.nonce_of(client.address) == 1
    with pytest.raises(ChainError, match=r"Refused\(200: unknown reason\)"):
        client.send("poke", 200)  # a code that is no reason
    with pytest.raises(Refused, match="not_staked"):
        client.call("poke", 5)
    receipt = client.send("poke", 1000)  # and the next send still has the right nonce
    assert client.nonce_of(client.address) == 2
    assert [client.decode_log(log) for log in receipt.logs] == [("Poked", {"code": 1000})]
    client.close()


def test_insufficient_funds_is_refused_without_sending(anvil: Anvil, poke_address: str) -> None:
    with EvmClient(anvil.url, EvmWallet.generate()) as poor:
        with pytest.raises(Refused) as info:
            poor.send_value(EvmWallet.generate().address, 1)
        assert info.value.reason == "insufficient_balance"
        assert poor.nonce_of(poor.address) == 0


def test_logs_of_the_contract(anvil: Anvil, funder: EvmClient, poke_address: str) -> None:
    client = _funded_client(anvil, funder, contract_address=poke_address, abi=POKE_ABI)
    start = client.block_number() + 1
    receipts = [client.send("poke", 256 + i) for i in range(3)]
    logs = client.get_logs(start, "latest", events=["Poked"])
    assert [client.decode_log(log) for log in logs][-3:] == [
        ("Poked", {"code": 256 + i}) for i in range(3)
    ]
    assert [int(log["blockNumber"], 16) for log in logs][-3:] == [r.block_number for r in receipts]
    block = client.block(receipts[-1].block_number)
    assert block.number == receipts[-1].block_number and block.timestamp > 1_600_000_000
    assert block.hash == receipts[-1].block_hash
    assert client.code_at(poke_address).endswith(POKED_TOPIC + bytes.fromhex("60206000a100"))
    with pytest.raises(ValueError):
        client.get_logs(start, "latest", events=["NoSuchEvent"])
    client.close()


def test_sync_send_and_its_fallback(
    anvil: Anvil, funder: EvmClient, poke_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _funded_client(anvil, funder, contract_address=poke_address, abi=POKE_ABI,
                            sync_send=True)  # fmt: skip
    assert client.send("poke", 300).logs
    with pytest.raises(Refused, match="bad_nonce"):
        client.send("poke", 0, gas=100_000)  # included and reverted: status 0 in the answer
    assert client.nonce_of(client.address) == 2 and client.sync_send
    original = client._request

    def no_sync(method: str, params: list[Any]) -> Any:
        if method == "eth_sendRawTransactionSync":
            raise RpcError(method, -32601, "Method not found", None)
        return original(method, params)

    monkeypatch.setattr(client, "_request", no_sync)
    assert client.send("poke", 301).logs
    assert not client.sync_send and client.nonce_of(client.address) == 3
    client.close()


def test_a_stopped_node_is_unavailable_fast(funder: EvmClient) -> None:
    node = Anvil().start()
    try:
        client = EvmClient(node.url, EvmWallet(node.dev_keys[0]), timeout=2.0)
        assert client.block_number() == 0
    finally:
        node.stop()
    started = time.monotonic()
    with pytest.raises(ChainUnavailable, match="not sent"):
        client.send_value(funder.address, 1)
    with pytest.raises(ChainUnavailable):
        client.balance(funder.address)
    assert time.monotonic() - started < 2


def test_a_silent_node_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with EvmClient(url, EvmWallet.generate(), timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(ChainUnavailable):
                client.block_number()
            with pytest.raises(ChainUnavailable, match="not sent"):
                client.send_value(client.address, 1)
            assert time.monotonic() - started < 2


def test_a_transaction_without_receipt_is_kept_not_resent() -> None:
    with Anvil(extra_args=["--no-mining"]) as node:
        client = EvmClient(node.url, EvmWallet(node.dev_keys[0]), timeout=2.0)
        to = EvmWallet.generate().address
        with pytest.raises(TxUnconfirmed) as info:
            client.send_value(to, 7, timeout=0.1)
        pending = info.value
        assert pending.broadcast and "was sent" in str(pending)
        assert client.receipt_of(pending.tx_hash) is None
        assert client.transaction_known(pending.tx_hash)
        assert client.rebroadcast(pending.raw_tx) == pending.tx_hash  # the same bytes: harmless
        client._request("evm_mine", [])
        receipt = client.receipt_of(pending.tx_hash, timeout=2.0)
        assert receipt is not None and receipt.tx_hash == pending.tx_hash
        assert client.balance(to) == 7
        with pytest.raises(TxUnconfirmed):  # the next one takes the next nonce
            client.send_value(to, 1, timeout=0.05)
        client._request("evm_mine", [])
        assert client.balance(to) == 8 and client.nonce_of(client.address, "latest") == 2
        client.close()


# --- revert data by hand ----------------------------------------------------------------------


def test_decode_revert() -> None:
    for code, reason in enumerate(REASON_CODES):
        refused = decode_revert(REFUSED_SELECTOR + eth_abi.encode(["uint8"], [code]))
        assert refused is not None and refused.reason == reason
    assert REFUSED_SELECTOR == keccak(b"Refused(uint8)")[:4] == bytes.fromhex("bd5adfec")
    assert decode_revert(REFUSED_SELECTOR + eth_abi.encode(["uint8"], [len(REASON_CODES)])) is None
    assert decode_revert(REFUSED_SELECTOR + bytes(31)) is None  # too short
    assert decode_revert(b"\x00\x00\x00\x00" + eth_abi.encode(["uint8"], [1])) is None
    assert decode_revert(b"") is None
    assert describe_revert(ERROR_SELECTOR + eth_abi.encode(["string"], ["no"])) == "Error('no')"
    assert describe_revert(PANIC_SELECTOR + eth_abi.encode(["uint256"], [0x11])) == "Panic(0x11)"
    custom = keccak(b"TransferFailed(address,uint256)")[:4]
    errors = {custom: ("TransferFailed", ["address", "uint256"])}
    who = "0x" + "ab" * 20
    data = custom + eth_abi.encode(["address", "uint256"], [who, 5])
    assert describe_revert(data, errors) == f"TransferFailed('{who}', 5)"
    assert describe_revert(b"\x01\x02") == "0x0102"
    assert describe_revert(ERROR_SELECTOR + b"\x01") == "0x" + (ERROR_SELECTOR + b"\x01").hex()


def test_decode_log_by_hand() -> None:
    abi = [
        {
            "type": "event",
            "name": "Staked",
            "anonymous": False,
            "inputs": [
                {"name": "taskKey", "type": "bytes32", "indexed": True},
                {"name": "account", "type": "address", "indexed": True},
                {"name": "taskId", "type": "string", "indexed": True},
                {"name": "amount", "type": "uint64", "indexed": False},
                {"name": "note", "type": "string", "indexed": False},
            ],
        }
    ]
    client = EvmClient("http://127.0.0.1:9", EvmWallet.generate(), abi=abi)
    account = "0x" + "Cd" * 20
    topic0 = keccak(b"Staked(bytes32,address,string,uint64,string)")
    log = {
        "topics": [
            "0x" + topic0.hex(),
            "0x" + ("11" * 32),
            "0x" + eth_abi.encode(["address"], [account.lower()]).hex(),
            "0x" + keccak(b"hello").hex(),
        ],
        "data": "0x" + eth_abi.encode(["uint64", "string"], [7, "hi"]).hex(),
    }
    assert client.decode_log(log) == (
        "Staked",
        {
            "taskKey": b"\x11" * 32,
            "account": account.lower(),
            "taskId": keccak(b"hello"),
            "amount": 7,
            "note": "hi",
        },
    )
    with pytest.raises(ValueError):
        client.decode_log({"topics": ["0x" + "22" * 32], "data": "0x"})
    client.close()
