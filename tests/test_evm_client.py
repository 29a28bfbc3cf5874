# The EVM plumbing under the EVM adapter, on real anvil processes: chain/evm/anvil.py (start,
# side by side, a taken port, a dying anvil, a state file, nothing left running), wallet.py
# (wallet.key created 0600, reused, refused when readable by others or corrupt and never
# overwritten; the peer binding), client.py (funding a fresh wallet, nonces over 20 sends in a
# row and after another sender used the key, refusals at estimation and on chain decoded from
# `Refused(uint8)`, a dead or silent node raising ChainUnavailable quickly, a transaction with
# no receipt in time kept by hash and found later, events, revert data by hand, cached fees
# the node finds too low fetched again) and its transport, transport.py, against a small local
# server or a TCP relay in front of anvil (a connection the server closed while idle replaced
# without resending; a reused one lost before the answer: only what is safe to repeat sent
# again, once, and a lost eth_sendRawTransaction answer ends in one transaction, or in
# TxUnconfirmed when the node is then gone; nothing listening or the node gone before the send:
# "not sent", fast; a server that never answers: the timeout; 8 threads at once each getting
# its own answers over kept-alive connections; a node restarted on the same port; proxies).
# The contract used here is a hand-assembled one (poke(code): codes < 256 revert with
# Refused(code), larger ones emit Poked(code)), so this file does not need TaskSettlement.
from __future__ import annotations

import http.server
import ipaddress
import json
import os
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import eth_abi
import pytest
from eth_utils import keccak

import chain.evm.anvil as anvil_module
import chain.evm.client as client_module
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
from chain.evm.transport import HttpJsonRpc, TransportError
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


# --- the transport (chain/evm/transport.py) ---------------------------------------------------


class _FakeNode:
    """A JSON-RPC server on 127.0.0.1 (HTTP/1.1, keep-alive, a thread per connection): the
    result of "echo" is its params, of anything else the method's name. `drop(n, methods)`:
    read the n-th request of a connection and close it without answering; `close_after`:
    close every connection right after answering (without saying so: as if idle too long);
    `reverse`: answer batches in reverse order. `seen`: every method received, in order."""

    def __init__(self, *, drop: Any = None, close_after: bool = False, reverse: bool = False,
                 delay: float = 0.0, tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.drop = drop or (lambda n, methods: False)
        self.close_after = close_after
        self.reverse = reverse
        self.delay = delay
        self.seen: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        node = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            served = 0

            def setup(self) -> None:
                super().setup()
                with node._lock:
                    node.connections += 1

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                requests = body if isinstance(body, list) else [body]
                methods = [r["method"] for r in requests]
                with node._lock:
                    node.seen.extend(methods)
                self.served += 1
                if node.drop(self.served, methods):
                    self.close_connection = True
                    return
                time.sleep(node.delay * random.random())
                answers = [{"jsonrpc": "2.0", "id": r["id"],
                            "result": r["params"] if r["method"] == "echo" else r["method"]}
                           for r in requests]  # fmt: skip
                if node.reverse:
                    answers.reverse()
                data = json.dumps(answers if isinstance(body, list) else answers[0]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = node.close_after

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> _FakeNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Relay:
    """A TCP relay on 127.0.0.1 to a node's port. `lose_answer_to = "method"`: the next request
    naming it is passed on, its answer is swallowed and the client's connection closed (the
    node did get the request); with `refuse_after`, the relay then takes no more
    connections. `drop_after = "method"`: the answer to the next request naming it is passed
    on with `Connection: close`, then the relay closes every connection and takes no more."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.lose_answer_to: str | None = None
        self.refuse_after = False
        self.drop_after: str | None = None
        self.lost = 0
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._socks += [client, upstream]
            state = {"lose": False, "drop": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, state),
                             daemon=True).start()  # fmt: skip

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        while data := _recv(client):
            if self.lose_answer_to and self.lose_answer_to.encode() in data:
                self.lose_answer_to, state["lose"] = None, True
            if self.drop_after and self.drop_after.encode() in data:
                self.drop_after, state["drop"] = None, True
            upstream.sendall(data)

    def _down(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        while data := _recv(upstream):
            if state["lose"]:
                self.lost += 1
                if self.refuse_after:
                    _close(self._listener)  # shutdown: wakes accept(), stops listening
                _close(client)
                _close(upstream)
                return
            if state["drop"]:
                # gone for good once this answer is out: no new connection is taken, and the
                # answer says so (Connection: close), so the client cannot race the close by
                # writing its next request on this connection before it sees it shut
                _close(self._listener)
                if data.startswith(b"HTTP/"):
                    data = data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
                client.sendall(data)
                self.close()
                return
            client.sendall(data)

    def close(self) -> None:
        _close(self._listener)  # shutdown: wakes accept(), stops listening
        for sock in self._socks:
            _close(sock)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def test_a_connection_closed_while_idle_is_replaced_without_resending() -> None:
    with _FakeNode(close_after=True) as node:
        rpc = HttpJsonRpc(node.url, timeout=2.0)
        for i in range(5):
            assert rpc.call("echo", [i])["result"] == [i]
            time.sleep(0.01)  # the server's close arrives while the connection is idle
        assert node.seen == ["echo"] * 5 and node.connections == 5
        assert rpc.resends() == 0
        rpc.close()


def test_a_reused_connection_lost_before_the_answer_resends_only_what_may_be_repeated() -> None:
    # every connection's second request is read and left unanswered (the connection closed)
    with _FakeNode(drop=lambda n, methods: n == 2) as node:
        rpc = HttpJsonRpc(node.url, timeout=2.0)
        assert rpc.call("eth_blockNumber", [])["result"] == "eth_blockNumber"
        assert rpc.call("eth_getBalance", ["0x00", "latest"])["result"] == "eth_getBalance"
        assert rpc.resends() == 1  # sent again, once, on a new connection
        assert node.seen == ["eth_blockNumber", "eth_getBalance", "eth_getBalance"]
        with pytest.raises(TransportError) as info:  # not safe to repeat: sent once
            rpc.call("evm_mine", [])
        assert info.value.sent and rpc.resends() == 1
        assert node.seen[3:] == ["evm_mine"]
        # nor a batch with such a request in it
        assert rpc.batch([("eth_chainId", [])])[0]["result"] == "eth_chainId"
        with pytest.raises(TransportError):
            rpc.batch([("eth_chainId", []), ("evm_mine", [])])
        assert node.seen[4:] == ["eth_chainId", "eth_chainId", "evm_mine"]
        rpc.close()
    # a new connection losing the request is not a stale one: no resend
    with _FakeNode(drop=lambda n, methods: True) as node:
        rpc = HttpJsonRpc(node.url, timeout=2.0)
        with pytest.raises(TransportError) as info:
            rpc.call("eth_blockNumber", [])
        assert info.value.sent and node.seen == ["eth_blockNumber"] and rpc.resends() == 0
        rpc.close()


def test_concurrent_calls_each_get_their_own_answer() -> None:
    with _FakeNode(delay=0.002, reverse=True) as node:
        rpc = HttpJsonRpc(node.url, timeout=5.0)

        def calls(thread: int) -> None:
            for i in range(40):
                assert rpc.call("echo", [thread, i])["result"] == [thread, i]
                answers = rpc.batch([("echo", [thread, i, "a"]), ("echo", [thread, i, "b"])])
                assert [a["result"] for a in answers] == [[thread, i, "a"], [thread, i, "b"]]

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(calls, range(8)))
        assert len(node.seen) == 8 * 40 * 3
        assert node.connections <= 8  # kept alive and reused, never two requests at once on one
        rpc.close()


def test_nothing_listening_is_not_sent_and_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rpc = HttpJsonRpc(f"http://127.0.0.1:{port}", timeout=5.0)
    with pytest.raises(TransportError) as info:
        rpc.call("eth_sendRawTransaction", ["0x00"])
    assert not info.value.sent
    with EvmClient(f"http://127.0.0.1:{port}", EvmWallet.generate(), timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(ChainUnavailable, match="not sent") as caught:
            client.send_value(client.address, 1)
        assert not isinstance(caught.value, TxUnconfirmed)
        assert time.monotonic() - started < 1


def test_a_node_that_accepts_and_never_answers_times_out() -> None:
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def accept() -> None:
            while True:
                try:
                    held.append(listener.accept()[0])  # read nothing, answer nothing
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        rpc = HttpJsonRpc(url, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TransportError, match="timed out") as info:
            rpc.call("eth_blockNumber", [])
        assert info.value.sent and 0.3 <= time.monotonic() - started < 1
        with EvmClient(url, EvmWallet.generate(), timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(ChainUnavailable, match="not sent"):
                client.send_value(client.address, 1)
            assert time.monotonic() - started < 1
    for sock in held:
        sock.close()


@contextmanager
def _relayed(anvil: Anvil, funder: EvmClient) -> Iterator[tuple[_Relay, EvmClient]]:
    """A client of a freshly funded wallet that talks to anvil through a relay."""
    relay = _Relay(anvil.port)
    wallet = EvmWallet.generate()
    funder.send_value(wallet.address, ETH)
    try:
        with EvmClient(relay.url, wallet, timeout=5.0) as client:
            yield relay, client
    finally:
        relay.close()


def test_a_send_whose_answer_was_lost_is_sent_again_as_the_same_bytes(
    anvil: Anvil, funder: EvmClient
) -> None:
    sink = EvmWallet.generate().address
    with _relayed(anvil, funder) as (relay, client):
        client.send_value(sink, 1)  # the connection is open: the next requests reuse it
        relay.lose_answer_to = "eth_sendRawTransaction"  # the node takes it, the answer is lost
        receipt = client.send_value(sink, 2)
        assert relay.lost == 1 and client._rpc.resends() == 1
        assert client.nonce_of(client.address) == 2  # one transaction, not two
        assert client.balance(sink) == 3
        assert client.send_value(sink, 4).block_number == receipt.block_number + 1


def test_a_lost_answer_then_no_node_is_unconfirmed_not_unsent(
    anvil: Anvil, funder: EvmClient
) -> None:
    sink = EvmWallet.generate().address
    with _relayed(anvil, funder) as (relay, client):
        client.send_value(sink, 1)
        relay.lose_answer_to = "eth_sendRawTransaction"
        relay.refuse_after = True  # sending it again finds nothing listening
        with pytest.raises(TxUnconfirmed) as info:
            client.send_value(sink, 2)
        assert not info.value.broadcast and "may have been sent" in str(info.value)
        receipt = funder.receipt_of(info.value.tx_hash, timeout=5.0)  # the node had it
        assert receipt is not None and funder.balance(sink) == 3


def test_a_node_gone_between_the_estimate_and_the_send_is_not_sent(
    anvil: Anvil, funder: EvmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first send's fees must still be cached at the second, so that its estimate goes
    # alone (on a loaded machine a send can take longer than FEE_TTL)
    monkeypatch.setattr(client_module, "FEE_TTL", 60.0)
    with _relayed(anvil, funder) as (relay, client):
        client.send_value(funder.address, 1)
        relay.drop_after = "eth_estimateGas"  # closed once the estimate is answered
        with pytest.raises(ChainUnavailable, match="not sent") as info:
            client.send_value(funder.address, 1)
        assert not isinstance(info.value, TxUnconfirmed)
        assert "eth_sendRawTransaction" in str(info.value)
        assert funder.nonce_of(client.address) == 1


def test_the_same_client_goes_on_after_its_node_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with Anvil(state_path=state) as node:
        port = node.port
        client = EvmClient(node.url, EvmWallet(node.dev_keys[0]), timeout=5.0)
        client.send_value(EvmWallet.generate().address, 1)
    with pytest.raises(ChainUnavailable, match="not sent"):
        client.send_value(EvmWallet.generate().address, 1)
    with Anvil(port=port, state_path=state) as node:  # the same port: the pooled one is dead
        sink = EvmWallet.generate().address
        client.send_value(sink, 5)
        assert client.balance(sink) == 5 and client.nonce_of(client.address) == 2
    client.close()


def test_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with _FakeNode() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "direct.example")
        rpc = HttpJsonRpc("http://node.example:8545/rpc", timeout=2.0)
        assert rpc.proxy == ("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
        assert rpc.call("echo", [1])["result"] == [1]  # answered by the "proxy"
        assert HttpJsonRpc("http://direct.example:8545", timeout=2.0).proxy is None
        monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
        with pytest.raises(ChainError, match="NO_PROXY=node.example"):
            HttpJsonRpc("http://node.example:8545", timeout=2.0)
        rpc.close()


def test_cached_fees_the_node_finds_too_low_are_fetched_again(
    anvil: Anvil, funder: EvmClient
) -> None:
    client = _funded_client(anvil, funder)
    sink = EvmWallet.generate().address
    client.send_value(sink, 1)  # fees fetched and cached
    low = {"type": 2, "maxFeePerGas": 1, "maxPriorityFeePerGas": 1}
    client._fees = (time.monotonic(), low)  # as if the base fee had soared since
    receipt = client.send_value(sink, 2)
    assert receipt.effective_gas_price > 1 and client._fees[1] != low
    assert client.nonce_of(client.address) == 2 and client.balance(sink) == 3
    client.close()


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate of 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tasknet test")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


def test_https_keeps_its_connections_and_replaces_closed_ones(tmp_path: Path) -> None:
    server_tls, client_tls = _self_signed(tmp_path)
    with _FakeNode(tls=server_tls, drop=lambda n, methods: n == 3) as node:
        rpc = HttpJsonRpc(node.url, timeout=2.0, context=client_tls)
        assert [rpc.call("echo", [i])["result"] for i in range(2)] == [[0], [1]]
        assert node.connections == 1
        assert rpc.call("eth_chainId", [])["result"] == "eth_chainId"  # lost once, sent again
        assert rpc.resends() == 1 and node.connections == 2
        assert node.seen == ["echo", "echo", "eth_chainId", "eth_chainId"]
        rpc.close()
        # the system's CAs do not know this certificate: nothing sent
        with EvmClient(node.url, EvmWallet.generate(), timeout=2.0) as client:
            with pytest.raises(ChainUnavailable, match="not sent") as info:
                client.send_value(client.address, 1)
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    with _FakeNode(tls=server_tls, close_after=True) as node:
        rpc = HttpJsonRpc(node.url, timeout=2.0, context=client_tls)
        for i in range(3):
            assert rpc.call("echo", [i])["result"] == [i]
            time.sleep(0.01)
        assert node.connections == 3 and rpc.resends() == 0 and len(node.seen) == 3
        rpc.close()
