# A synchronous JSON-RPC client for one EVM contract, signing locally with the node's wallet:
# reads (blocks, balances, calls, logs), ABI encoding and event decoding, and `send`, which
# estimates, signs, numbers (a local nonce), submits and waits for the receipt, turning the
# contract's `Refused(uint8)` reverts into `chain.rules.Refused` and transport failures into
# `chain.adapter.ChainUnavailable`. Also plain value transfers and deploying an artifact.
# Lives here: fees (cached for FEE_TTL seconds, refreshed when the node finds them too low),
# gas, nonces, receipts, revert decoding. The JSON-RPC transport is transport.py (http.client,
# kept-alive connections, a request sent again only when a reused connection turned out to be
# closed and the request is safe to repeat); web3 is not used.
# Must not live here: async code or the rules' meaning (the adapter, chain/evm/adapter.py),
# key files (wallet.py), processes (anvil.py). A transaction whose fate is unknown is never
# sent again blindly: `TxUnconfirmed` carries its hash and raw bytes, `receipt_of` checks it.
from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import TracebackType
from typing import Any, NamedTuple, Self, cast

import eth_abi
from eth_abi.grammar import ABIType, TupleType, parse
from eth_utils import keccak

from chain.adapter import ChainError, ChainUnavailable
from chain.rules import REASON_CODES, Refused

from .transport import HttpJsonRpc, TransportError
from .wallet import EvmWallet, address_bytes

REFUSED_SELECTOR = keccak(b"Refused(uint8)")[:4]
ERROR_SELECTOR = keccak(b"Error(string)")[:4]  # Solidity's require(..., "message")
PANIC_SELECTOR = keccak(b"Panic(uint256)")[:4]  # Solidity's assert / arithmetic checks
DEFAULT_TIMEOUT = 10.0  # seconds one JSON-RPC request may take
DEFAULT_RECEIPT_TIMEOUT = 120.0  # seconds `send` waits for a receipt
GAS_FACTOR = 1.2  # gas limit = estimate * GAS_FACTOR + GAS_MARGIN
GAS_MARGIN = 10_000
FEE_TTL = 1.0  # seconds the node's gas price and base fee are reused for further sends
_NONCE_ERRORS = ("nonce too low", "nonce too high", "invalid nonce", "nonce is too low",
                 "replacement transaction underpriced", "replacement fee too low")  # fmt: skip
_KNOWN_TX_ERRORS = ("already known", "already imported", "known transaction")
_FEE_ERRORS = ("less than block base fee", "transaction underpriced", "fee cap too low",
               "feecap too low", "gas price too low", "max fee per gas too low")  # fmt: skip


class RpcError(ChainError):
    """The node answered a request with a JSON-RPC error (not a transport failure)."""

    def __init__(self, method: str, code: int, message: str, data: bytes | None) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data


class TxUnconfirmed(ChainUnavailable):
    """A transaction was sent (or may have been) but its fate is unknown: the receipt did not
    arrive in time or the node stopped answering. Do not build a new transaction for the same
    operation: check `EvmClient.receipt_of(tx_hash)`, or send the very same bytes again with
    `EvmClient.rebroadcast(raw_tx)` (one nonce: it cannot be included twice).
    `broadcast` is True when the node acknowledged the transaction, False when the request
    failed after it may have reached the node."""

    def __init__(self, message: str, tx_hash: bytes, raw_tx: bytes, broadcast: bool) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash
        self.raw_tx = raw_tx
        self.broadcast = broadcast


@dataclass(frozen=True)
class TxReceipt:
    """An included transaction that succeeded (status 1). `logs` are raw JSON-RPC logs
    (`EvmClient.decode_log` decodes the contract's), `raw` the node's receipt as it came."""

    tx_hash: bytes
    block_number: int
    block_hash: bytes
    gas_used: int
    effective_gas_price: int
    contract_address: str | None
    logs: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(repr=False)


class Block(NamedTuple):
    number: int
    timestamp: int
    hash: bytes
    base_fee: int | None  # None before London (legacy fee chains)


# --- pure helpers -------------------------------------------------------------------------------


def decode_revert(data: bytes) -> Refused | None:
    """The contract's `Refused(uint8 reason)` revert as the rules' Refused, else None."""
    if len(data) != 36 or data[:4] != REFUSED_SELECTOR:
        return None
    code = int.from_bytes(data[4:], "big")
    if code >= len(REASON_CODES):
        return None
    return Refused(REASON_CODES[code], "reverted by the contract")


def describe_revert(
    data: bytes, errors: Mapping[bytes, tuple[str, list[str]]] | None = None
) -> str:
    """Human text for any revert data: Refused, Error(string), Panic(uint256), an error of
    the contract's ABI (`errors`: selector -> (name, types)), else the hex."""
    selector, body = data[:4], data[4:]
    try:
        if selector == REFUSED_SELECTOR and len(body) == 32:
            code = int.from_bytes(body, "big")
            name = REASON_CODES[code] if code < len(REASON_CODES) else "unknown reason"
            return f"Refused({code}: {name})"
        if selector == ERROR_SELECTOR:
            return f"Error({eth_abi.decode(['string'], body)[0]!r})"
        if selector == PANIC_SELECTOR:
            return f"Panic(0x{eth_abi.decode(['uint256'], body)[0]:x})"
        if errors and selector in errors:
            name, types = errors[selector]
            values = eth_abi.decode(types, body)
            return f"{name}({', '.join(repr(v) for v in values)})"
    except Exception:  # malformed revert data: fall through to the hex
        pass
    return "0x" + data.hex() if data else "no revert data"


def _abi_type(entry: Mapping[str, Any]) -> str:
    """The canonical type of one ABI input/output (tuples spelt out: '(uint256,address)[]')."""
    typ = str(entry["type"])
    if typ.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in entry.get("components", []))
        return f"({inner}){typ[len('tuple') :]}"
    return typ


@lru_cache(maxsize=512)
def _parsed(typ: str) -> ABIType:
    return parse(typ)


def _lower_addresses(t: ABIType, value: Any) -> Any:
    """`value` decoded as `t` with every address in lowercase (tasknet's spelling)."""
    if t.arrlist:
        return [_lower_addresses(t.item_type, v) for v in value]
    if isinstance(t, TupleType):
        return tuple(_lower_addresses(c, v) for c, v in zip(t.components, value, strict=True))
    if getattr(t, "base", None) == "address":
        return str(value).lower()
    return value


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ChainError(f"expected hex data from the node, got {value!r}")
    return bytes.fromhex(value[2:])


def _gas_limit(estimate: Any) -> int:
    return int(_int(estimate) * GAS_FACTOR) + GAS_MARGIN


def _int(value: Any) -> int:
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ChainError(f"expected a quantity from the node, got {value!r}")
    return int(value, 16)


def _revert_data(error: Any) -> bytes | None:
    """Revert data in a JSON-RPC error's `data`: a hex string (anvil, geth) or nested in a
    dict (some providers)."""
    if isinstance(error, str):
        text = error.removeprefix("Reverted ")
        if text.startswith("0x"):
            try:
                return bytes.fromhex(text[2:])
            except ValueError:
                return None
        return None
    if isinstance(error, dict):
        for key in ("data", "originalError", "result"):
            if key in error:
                found = _revert_data(error[key])
                if found is not None:
                    return found
    return None


def _never_reached_node(exc: BaseException) -> bool:
    """Whether a transport failure happened before the request could reach the node: no
    connection could be made (refused, connect timeout, ...) and no earlier attempt wrote any
    of it (transport.TransportError.sent)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TransportError):
            return not seen.sent
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class _Function:
    name: str
    selector: bytes
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class _Event:
    name: str
    inputs: list[tuple[str, str, bool]]  # (name, type, indexed)


class _Abi:
    def __init__(self, abi: Sequence[Mapping[str, Any]]) -> None:
        self.functions: dict[str, list[_Function]] = {}
        self.events: dict[bytes, _Event] = {}
        self.errors: dict[bytes, tuple[str, list[str]]] = {}
        for entry in abi:
            kind = entry.get("type", "function")
            name = str(entry.get("name", ""))
            inputs = [_abi_type(i) for i in entry.get("inputs", [])]
            signature = f"{name}({','.join(inputs)})".encode()
            if kind == "function":
                outputs = [_abi_type(o) for o in entry.get("outputs", [])]
                fn = _Function(name, keccak(signature)[:4], inputs, outputs)
                self.functions.setdefault(name, []).append(fn)
            elif kind == "event" and not entry.get("anonymous", False):
                fields = [(str(i.get("name", "")), _abi_type(i), bool(i.get("indexed", False)))
                          for i in entry.get("inputs", [])]  # fmt: skip
                self.events[keccak(signature)] = _Event(name, fields)
            elif kind == "error":
                self.errors[keccak(signature)[:4]] = (name, inputs)

    def function(self, name: str, argc: int) -> _Function:
        matches = [f for f in self.functions.get(name, []) if len(f.inputs) == argc]
        if len(matches) != 1:
            have = ", ".join(f"{name}({','.join(f.inputs)})" for f in self.functions.get(name, []))
            raise ValueError(f"no single ABI function {name} with {argc} arguments: {have or '-'}")
        return matches[0]


# --- the client ---------------------------------------------------------------------------------


class EvmClient:
    """One account (`wallet`) talking to one node (`url`) about one contract.

    Reads may come from several threads at once; sends are numbered and submitted one at a
    time (a lock), and wait for their receipts in parallel. Addresses are '0x' + 40 lowercase
    hex digits, in arguments (any case accepted) and in everything returned.

    `timeout`: seconds one JSON-RPC request may wait for the node's answer (any one read of
    it; connecting may take min(timeout, 3 s)); `receipt_timeout`: seconds `send` waits for
    inclusion. `sync_send`: submit with eth_sendRawTransactionSync (EIP-7966, anvil has
    it), which answers with the receipt, so a send is one round trip instead of a submit and
    polls; for automining chains only: the submit lock is held until inclusion, and a chain
    slower than `timeout` makes every send a TxUnconfirmed. Falls back to polling by itself
    when the node lacks the method."""

    def __init__(
        self,
        url: str,
        wallet: EvmWallet,
        *,
        contract_address: str | None = None,
        abi: Sequence[Mapping[str, Any]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        receipt_timeout: float = DEFAULT_RECEIPT_TIMEOUT,
        sync_send: bool = False,
    ) -> None:
        self.url = url
        self.wallet = wallet
        self.timeout = timeout
        self.receipt_timeout = receipt_timeout
        self.sync_send = sync_send
        self._rpc = HttpJsonRpc(url, timeout=timeout)
        self._send_lock = threading.Lock()
        self._fees: tuple[float, dict[str, int]] | None = None  # (when fetched, fee fields)
        self._nonce: int | None = None
        self._chain_id: int | None = None
        self.contract_address: str | None = None
        self._abi = _Abi([])
        if contract_address is not None or abi is not None:
            self.use_contract(contract_address, abi or [])

    def use_contract(self, address: str | None, abi: Sequence[Mapping[str, Any]]) -> None:
        """Point the client at a (deployed) contract with its ABI."""
        self.contract_address = None if address is None else _address(address)
        self._abi = _Abi(abi)

    @property
    def address(self) -> str:
        return self.wallet.address

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------------

    def _request(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC request: its result, RpcError for an error answer, ChainUnavailable
        (caused by the transport.TransportError) when the node could not be reached in time,
        ChainError for an answer that is not JSON-RPC."""
        try:
            response = self._rpc.call(method, params)
        except TransportError as exc:
            raise ChainUnavailable(f"{method}: {exc}") from exc
        return self._result(method, response)

    def _result(self, method: str, response: Mapping[str, Any]) -> Any:
        if not isinstance(response, Mapping):
            raise ChainError(f"{method}: malformed JSON-RPC answer {response!r:.200}")
        error = response.get("error")
        if error is not None:
            if not isinstance(error, Mapping):
                raise RpcError(method, -1, str(error), None)
            raise RpcError(
                method,
                int(error.get("code", -1)),
                str(error.get("message", "")),
                _revert_data(error.get("data")),
            )
        if "result" not in response:
            raise ChainError(f"{method}: malformed JSON-RPC answer {response!r:.200}")
        return response["result"]

    def _batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several requests in one round trip: each item is its result or its RpcError."""
        try:
            responses = self._rpc.batch(calls)
        except TransportError as exc:
            raise ChainUnavailable(f"batch: {exc}") from exc
        if not isinstance(responses, list) or len(responses) != len(calls):
            self._result("batch", cast(Mapping[str, Any], responses))  # raises its error
            raise ChainError(f"batch: malformed answer from {self.url}")
        out: list[Any] = []
        for (method, _), response in zip(calls, responses, strict=True):
            try:
                out.append(self._result(method, cast(Mapping[str, Any], response)))
            except RpcError as exc:
                out.append(exc)
        return out

    # --- reads ------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = _int(self._request("eth_chainId", []))
        return self._chain_id

    def block_number(self) -> int:
        return _int(self._request("eth_blockNumber", []))

    def block(self, number: int | str = "latest") -> Block:
        tag = hex(number) if isinstance(number, int) else number
        raw = self._request("eth_getBlockByNumber", [tag, False])
        if raw is None:
            raise ChainError(f"no block {number}")
        base = raw.get("baseFeePerGas")
        return Block(
            _int(raw["number"]),
            _int(raw["timestamp"]),
            _bytes(raw["hash"]),
            None if base is None else _int(base),
        )

    def balance(self, address: str, block: int | str = "latest") -> int:
        """The account's balance in wei."""
        tag = hex(block) if isinstance(block, int) else block
        return _int(self._request("eth_getBalance", [_address(address), tag]))

    def nonce_of(self, address: str, block: str = "pending") -> int:
        return _int(self._request("eth_getTransactionCount", [_address(address), block]))

    def code_at(self, address: str) -> bytes:
        return _bytes(self._request("eth_getCode", [_address(address), "latest"]))

    def call(self, fn_name: str, *args: Any, block: int | str = "latest") -> Any:
        """A view call: the decoded output (one value, a tuple for several, None for none).
        A `Refused(uint8)` revert raises chain.rules.Refused."""
        fn = self._abi.function(fn_name, len(args))
        tag = hex(block) if isinstance(block, int) else block
        data = _hex(self._encode(fn, args))
        call = {"from": self.address, "to": self._require_contract(), "data": data}
        try:
            out = _bytes(self._request("eth_call", [call, tag]))
        except RpcError as exc:
            raise self._revert_error(fn_name, exc, "(a call: nothing sent)") from exc
        return self._decode_output(fn, out)

    def get_logs(
        self, from_block: int, to_block: int | str, *, events: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The contract's raw logs in [from_block, to_block], in chain order; `events` keeps
        only those events (by name)."""
        query: dict[str, Any] = {
            "address": self._require_contract(),
            "fromBlock": hex(from_block),
            "toBlock": hex(to_block) if isinstance(to_block, int) else to_block,
        }
        if events:
            wanted = [t for t, e in self._abi.events.items() if e.name in set(events)]
            if len(wanted) != len(set(events)):
                raise ValueError(f"unknown events in {list(events)}")
            query["topics"] = [[_hex(t) for t in wanted]]
        logs = self._request("eth_getLogs", [query])
        if not isinstance(logs, list):
            raise ChainError(f"eth_getLogs: malformed answer {logs!r:.200}")
        return logs

    def decode_log(self, log: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """(event name, arguments by name) of one raw log of the contract. Indexed dynamic
        arguments (string, bytes, arrays) come as their 32-byte topic hash."""
        topics = [_bytes(t) for t in log.get("topics", [])]
        if not topics or topics[0] not in self._abi.events:
            raise ValueError(f"not an event of the contract's ABI: {dict(log)!r:.200}")
        event = self._abi.events[topics[0]]
        indexed = [(n, t) for n, t, i in event.inputs if i]
        plain = [(n, t) for n, t, i in event.inputs if not i]
        if len(topics) != len(indexed) + 1:
            raise ValueError(f"{event.name}: {len(topics) - 1} topics for {len(indexed)} indexed")
        args: dict[str, Any] = {}
        for (name, typ), topic in zip(indexed, topics[1:], strict=True):
            dynamic = _parsed(typ).is_dynamic or isinstance(_parsed(typ), TupleType)
            args[name] = topic if dynamic else self._decode_values([typ], topic)[0]
        values = self._decode_values([t for _, t in plain], _bytes(log.get("data", "0x")))
        for (name, _), value in zip(plain, values, strict=True):
            args[name] = value
        return event.name, {n: args[n] for n, _, _ in event.inputs}

    # --- writes -----------------------------------------------------------------------------

    def send(
        self,
        fn_name: str,
        *args: Any,
        value: int = 0,
        gas: int | None = None,
        timeout: float | None = None,
    ) -> TxReceipt:
        """Call `fn_name(*args)` on the contract in a transaction (value in wei) and wait for
        its receipt. Refused(reason) when the contract refuses it, either at estimation (then
        nothing was sent) or on chain (then it was included and reverted: gas spent, state
        unchanged). `gas` skips the estimation. TxUnconfirmed when its fate is unknown."""
        fn = self._abi.function(fn_name, len(args))
        data = self._encode(fn, args)
        to = address_bytes(self._require_contract())
        return self._transact(fn_name, to, data, value, gas, timeout)

    def send_value(self, to: str, wei: int, *, timeout: float | None = None) -> TxReceipt:
        """A plain transfer of `wei` to `to`."""
        return self._transact("transfer", address_bytes(to), b"", wei, None, timeout)

    def deploy(self, artifact: Mapping[str, Any], *, timeout: float | None = None) -> str:
        """Deploy a compiled contract whose constructor takes no arguments; its address.
        `artifact["bytecode"]` is the creation code: hex, or solc's {"object": hex}."""
        code = artifact.get("bytecode")
        if isinstance(code, Mapping):
            code = code.get("object")
        if not isinstance(code, str) or not code:
            raise ValueError("artifact has no bytecode")
        init = bytes.fromhex(code.removeprefix("0x"))
        receipt = self._transact("deploy", None, init, 0, None, timeout)
        if receipt.contract_address is None:
            raise ChainError(f"deploy: the receipt of 0x{receipt.tx_hash.hex()} has no address")
        return receipt.contract_address

    def receipt_of(self, tx_hash: bytes, timeout: float = 0.0) -> TxReceipt | None:
        """The receipt of a transaction sent earlier (e.g. one of a TxUnconfirmed), waiting up
        to `timeout` seconds for it: None while it is not included (pending, or unknown to the
        node: see `transaction_known`); Refused / ChainError when it was included and reverted."""
        deadline = time.perf_counter() + timeout
        return self._poll_receipt("receipt_of", tx_hash, b"", deadline, raise_on_timeout=False)

    def transaction_known(self, tx_hash: bytes) -> bool:
        """Whether the node knows the transaction (pending or included)."""
        return self._request("eth_getTransactionByHash", [_hex(tx_hash)]) is not None

    def rebroadcast(self, raw_tx: bytes) -> bytes:
        """Submit the very same signed bytes again (a TxUnconfirmed's `raw_tx`): harmless if the
        node has them or included them already. Its hash."""
        tx_hash = keccak(raw_tx)
        try:
            self._request("eth_sendRawTransaction", [_hex(raw_tx)])
        except RpcError as exc:
            message = exc.message.lower()
            if not any(m in message for m in (*_KNOWN_TX_ERRORS, "nonce too low")):
                raise
        with self._send_lock:
            self._nonce = None  # resynchronise from the node before the next send
        return tx_hash

    def _transact(
        self,
        label: str,
        to: bytes | None,
        data: bytes,
        value: int,
        gas: int | None,
        timeout: float | None,
    ) -> TxReceipt:
        if value < 0:
            raise ValueError("value must not be negative")
        deadline = time.perf_counter() + (self.receipt_timeout if timeout is None else timeout)
        call: dict[str, Any] = {"from": self.address, "data": _hex(data), "value": hex(value)}
        if to is not None:
            call["to"] = _hex(to)
        gas_limit, fees, fresh = self._prepare(label, call, gas)
        try:
            chain_id = self.chain_id
        except ChainUnavailable as exc:
            raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
        tx: dict[str, Any] = {"chainId": chain_id, "value": value, "data": data, "gas": gas_limit}
        if to is not None:
            tx["to"] = to
        tx_hash, raw, included = self._submit(label, tx, fees, fresh)
        if included is not None:
            return self._settle(label, included)
        receipt = self._poll_receipt(label, tx_hash, raw, deadline, raise_on_timeout=True)
        assert receipt is not None
        return receipt

    def _prepare(
        self, label: str, call: dict[str, Any], gas: int | None
    ) -> tuple[int, dict[str, int], bool]:
        """The gas limit (estimated unless given), the fee fields and whether they were just
        fetched, in one round trip: the estimate alone while the fees fetched less than
        FEE_TTL seconds ago serve again, else a batch of the gas price, the latest block and
        the estimate. A revert at estimation raises Refused / ChainError: nothing is sent."""
        cached = self._fees
        if cached is not None and time.monotonic() - cached[0] < FEE_TTL:
            if gas is None:
                try:
                    gas = _gas_limit(self._request("eth_estimateGas", [call, "pending"]))
                except ChainUnavailable as exc:
                    raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
                except RpcError as exc:
                    raise self._revert_error(label, exc, "(at estimation: not sent)") from exc
            return gas, cached[1], False
        calls: list[tuple[str, list[Any]]] = [
            ("eth_gasPrice", []),
            ("eth_getBlockByNumber", ["latest", False]),
        ]
        if gas is None:
            calls.append(("eth_estimateGas", [call, "pending"]))
        try:
            results = self._batch(calls)
        except ChainUnavailable as exc:
            raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
        for result in reversed(results):  # the estimate's revert first
            if isinstance(result, RpcError):
                raise self._revert_error(label, result, "(at estimation: not sent)") from result
        fees = self._keep_fees(results[0], results[1])
        return (_gas_limit(results[2]) if gas is None else gas), fees, True

    def _keep_fees(self, gas_price: Any, block: Any) -> dict[str, int]:
        """The fee fields for the node's gas price and latest block, kept for FEE_TTL s."""
        price = _int(gas_price)
        base = block.get("baseFeePerGas") if isinstance(block, dict) else None
        fees: dict[str, int]
        if base is None:  # a chain without EIP-1559: a legacy transaction at the node's price
            fees = {"gasPrice": price}
        else:
            base_fee = _int(base)
            tip = max(price - base_fee, 1)
            # room for two blocks of maximal base fee growth (12.5% each) before it is
            # underpriced; kept FEE_TTL = 1 s, less than a block on most chains (fees the node
            # then finds too low are fetched again: `_submit`)
            fees = {"type": 2, "maxFeePerGas": 2 * base_fee + tip, "maxPriorityFeePerGas": tip}
        self._fees = (time.monotonic(), fees)
        return fees

    def _fresh_fees(self, label: str) -> dict[str, int]:
        """The fee fields fetched now (a send the node found underpriced at cached fees)."""
        try:
            price, block = self._batch(
                [("eth_gasPrice", []), ("eth_getBlockByNumber", ["latest", False])]
            )
        except ChainUnavailable as exc:
            raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
        for result in (price, block):
            if isinstance(result, RpcError):
                raise ChainError(f"{label}: not sent: the fees are unknown: {result}") from result
        return self._keep_fees(price, block)

    def _submit(
        self, label: str, tx: dict[str, Any], fees: dict[str, int], fresh: bool
    ) -> tuple[bytes, bytes, dict[str, Any] | None]:
        """Number, sign and submit; (hash, raw, the receipt when `sync_send` got it). The
        local nonce moves on only when the node took the transaction; a nonce the node
        disagrees with is resynchronised (twice); fees from the cache that the node finds
        too low are fetched again (once). A refusal of a request the transport had to send
        twice (transport.py) is checked against the node: if it has these bytes, the first
        copy reached it and the transaction is sent."""
        with self._send_lock:
            for _ in range(4):
                if self._nonce is None:
                    try:
                        self._nonce = self.nonce_of(self.address, "pending")
                    except ChainUnavailable as exc:
                        raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
                raw = self.wallet.sign_transaction({**tx, **fees, "nonce": self._nonce})
                tx_hash = keccak(raw)
                included: dict[str, Any] | None = None
                resends = self._rpc.resends()
                try:
                    if self.sync_send:
                        included = self._send_sync(raw)
                    else:
                        self._request("eth_sendRawTransaction", [_hex(raw)])
                except RpcError as exc:
                    message = exc.message.lower()
                    if any(m in message for m in _KNOWN_TX_ERRORS) or (
                        self._rpc.resends() != resends and self._taken(label, tx_hash, raw, exc)
                    ):
                        self._nonce += 1  # these very bytes are in the node's pool already
                        return tx_hash, raw, None
                    if any(m in message for m in _NONCE_ERRORS):
                        self._nonce = None
                        continue
                    if not fresh and any(m in message for m in _FEE_ERRORS):
                        fees, fresh = self._fresh_fees(label), True
                        continue
                    raise self._revert_error(label, exc, "(refused by the node: not sent)") from exc
                except ChainUnavailable as exc:
                    cause = exc.__cause__
                    if cause is not None and _never_reached_node(cause):
                        raise ChainUnavailable(f"{label}: not sent: {exc}") from exc
                    self._nonce = None  # taken or not: ask the node before the next send
                    raise TxUnconfirmed(
                        f"{label}: transaction 0x{tx_hash.hex()} may have been sent: {exc}",
                        tx_hash, raw, broadcast=False,
                    ) from exc  # fmt: skip
                except ChainError as exc:  # an answer that is not JSON-RPC: taken or not?
                    self._nonce = None
                    raise TxUnconfirmed(
                        f"{label}: transaction 0x{tx_hash.hex()} may have been sent: {exc}",
                        tx_hash, raw, broadcast=False,
                    ) from exc  # fmt: skip
                self._nonce += 1
                return tx_hash, raw, included
            raise ChainError(f"{label}: the node kept refusing the nonce or the fees; another "
                             f"sender uses {self.address}?")  # fmt: skip

    def _taken(self, label: str, tx_hash: bytes, raw: bytes, refusal: RpcError) -> bool:
        """Whether the node has the transaction it refused when sent a second time."""
        try:
            return self.transaction_known(tx_hash)
        except ChainUnavailable as exc:
            self._nonce = None
            raise TxUnconfirmed(
                f"{label}: transaction 0x{tx_hash.hex()} may have been sent (sent again on a "
                f"new connection and refused: {refusal.message}); cannot check: {exc}",
                tx_hash, raw, broadcast=False,
            ) from exc  # fmt: skip

    def _send_sync(self, raw: bytes) -> dict[str, Any] | None:
        """eth_sendRawTransactionSync (EIP-7966): the receipt in the same round trip; None
        when the node does not have the method (then the transaction was sent the usual way
        and `sync_send` is off from now on)."""
        try:
            receipt = self._request("eth_sendRawTransactionSync", [_hex(raw)])
        except RpcError as exc:
            if exc.code != -32601:  # anything but "method not found"
                raise
            self.sync_send = False
            self._request("eth_sendRawTransaction", [_hex(raw)])
            return None
        return receipt if isinstance(receipt, dict) else None

    def _poll_receipt(
        self, label: str, tx_hash: bytes, raw: bytes, deadline: float, *, raise_on_timeout: bool
    ) -> TxReceipt | None:
        start = time.perf_counter()
        polls = 0
        while True:
            try:
                receipt = self._request("eth_getTransactionReceipt", [_hex(tx_hash)])
            except ChainUnavailable as exc:
                if not raw:  # receipt_of: nothing of ours in flight
                    raise
                raise TxUnconfirmed(
                    f"{label}: transaction 0x{tx_hash.hex()} was sent; its receipt is unknown: "
                    f"{exc}", tx_hash, raw, broadcast=True,
                ) from exc  # fmt: skip
            if receipt is not None:
                return self._settle(label, receipt)
            now = time.perf_counter()
            if now >= deadline:
                if not raise_on_timeout:
                    return None
                raise TxUnconfirmed(
                    f"{label}: transaction 0x{tx_hash.hex()} was sent; no receipt after "
                    f"{now - start:.1f} s", tx_hash, raw, broadcast=True,
                )  # fmt: skip
            # the first poll right after the send, then 0.25, 0.5, 1, 2, 4, 8 ms apart (a
            # local chain mines within a millisecond), then 10 ms, slower as the wait grows (a
            # chain with blocks), at most 250 ms
            polls += 1
            pause = 0.00025 * 2 ** (polls - 1) if polls <= 6 else 0.01 + 0.02 * (now - start)
            time.sleep(min(deadline - now, pause, 0.25))

    def _settle(self, label: str, raw: dict[str, Any]) -> TxReceipt:
        block_number = _int(raw["blockNumber"])
        if _int(raw.get("status", "0x1")) != 1:
            raise self._replay_revert(label, raw, block_number)
        contract = raw.get("contractAddress")
        return TxReceipt(
            tx_hash=_bytes(raw["transactionHash"]),
            block_number=block_number,
            block_hash=_bytes(raw["blockHash"]),
            gas_used=_int(raw["gasUsed"]),
            effective_gas_price=_int(raw.get("effectiveGasPrice", "0x0")),
            contract_address=None if contract is None else str(contract).lower(),
            logs=tuple(raw.get("logs", [])),
            raw=raw,
        )

    def _replay_revert(self, label: str, receipt: dict[str, Any], block_number: int) -> Exception:
        """Why an included transaction reverted: its call replayed at its block."""
        tx_hex = receipt["transactionHash"]
        where = f"(included in block {block_number} and reverted: {tx_hex})"
        try:
            tx = self._request("eth_getTransactionByHash", [tx_hex])
            if not isinstance(tx, dict):
                return ChainError(f"{label} {where}; the node no longer has the transaction")
            call = {k: tx[k] for k in ("from", "to", "value", "gas") if tx.get(k) is not None}
            call["data"] = tx.get("input", "0x")
            self._request("eth_call", [call, hex(block_number)])
        except RpcError as exc:
            return self._revert_error(label, exc, where)
        except ChainUnavailable as exc:
            return ChainUnavailable(f"{label}: {where}; cannot replay it to see why: {exc}")
        gas_used = _int(receipt.get("gasUsed", "0x0"))
        return ChainError(f"{label} {where}; replaying it succeeds (gas used {gas_used})")

    def _revert_error(self, label: str, exc: RpcError, where: str) -> Exception:
        if exc.data:
            refused = decode_revert(exc.data)
            if refused is not None:
                return Refused(refused.reason, f"{label} {where}")
            return ChainError(
                f"{label} reverted {where}: {describe_revert(exc.data, self._abi.errors)}"
            )
        if "insufficient funds" in exc.message.lower():
            return Refused(
                "insufficient_balance",
                f"{label} {where}: {self.address} cannot pay gas + value ({exc.message})",
            )
        return ChainError(f"{label} {where}: {exc}")

    # --- ABI --------------------------------------------------------------------------------

    def _require_contract(self) -> str:
        if self.contract_address is None:
            raise ChainError("no contract address: deploy one or call use_contract")
        return self.contract_address

    def _encode(self, fn: _Function, args: Sequence[Any]) -> bytes:
        return fn.selector + eth_abi.encode(fn.inputs, list(args))

    def _decode_values(self, types: list[str], data: bytes) -> list[Any]:
        values = eth_abi.decode(types, data)
        return [_lower_addresses(_parsed(t), v) for t, v in zip(types, values, strict=True)]

    def _decode_output(self, fn: _Function, data: bytes) -> Any:
        if not fn.outputs:
            return None
        values = self._decode_values(fn.outputs, data)
        return values[0] if len(values) == 1 else tuple(values)


def _address(address: str) -> str:
    return _hex(address_bytes(address))
