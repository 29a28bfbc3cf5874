# Settlement scenarios on real chains: a `World` is one fresh chain with named accounts whose
# transactions are applied at chosen slots, on the embedded ledger (a real SQLite ledger file
# whose clock the test sets) or on an EVM chain (a real anvil with a freshly deployed
# TaskSettlement; the next block's timestamp is set before each transaction, one transaction
# at a time, so no pending transaction ever crosses a time jump). Scenarios use names ("A",
# "owner"); `World.acct` gives the chain's account of a name (a peer id, an EVM address).
from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from chain.adapter import ChainAdapter
from chain.ledger import Ledger, LedgerAdapter, account_of
from chain.merkle import distribution_proofs, distribution_root
from chain.rules import ChainState, Refused, round_view, task_view
from p2p.identity import Identity

SUPPLY = 10**9


class World(abc.ABC):
    """One chain, its named accounts and a slot counter relative to the world's start."""

    names: Sequence[str]
    leaf_format: str

    @abc.abstractmethod
    def acct(self, name: str) -> str: ...

    @abc.abstractmethod
    def _send(self, name: str, slot: int, tx: dict[str, Any]) -> dict[str, Any]:
        """Apply `tx` by `name` at world slot `slot` (absolute: start + slot); the result."""

    @property
    @abc.abstractmethod
    def state(self) -> ChainState:
        """The settlement state as of the last transaction (the ledger's, the EVM replica's)."""

    @abc.abstractmethod
    def start(self) -> int:
        """The chain slot of world slot 0."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def send(self, who: str, slot: int, op: str, **fields: Any) -> dict[str, Any]:
        return self._send(who, slot, {"op": op, **fields})

    def refused(self, who: str, slot: int, op: str, **fields: Any) -> str:
        """The reason `op` is refused; asserts that the state did not change."""
        before = self.state.to_bytes()
        try:
            self._send(who, slot, {"op": op, **fields})
        except Refused as exc:
            assert self.state.to_bytes() == before, f"{op} refused ({exc}) but changed the state"
            return exc.reason
        raise AssertionError(f"{op} by {who} at {slot} was accepted")

    def round_view(self, task_id: str, r: int, slot: int | None = None) -> dict[str, Any]:
        at = None if slot is None else self.start() + slot
        return _named(round_view(self.state, task_id, r, at), self)

    def task_view(self, task_id: str, slot: int | None = None) -> dict[str, Any]:
        at = None if slot is None else self.start() + slot
        return task_view(self.state, task_id, at)

    def root(self, listing: dict[str, int]) -> bytes:
        return distribution_root({self.acct(n): v for n, v in listing.items()}, self.leaf_format)

    def proofs(self, listing: dict[str, int]) -> dict[str, list[bytes]]:
        proofs = distribution_proofs({self.acct(n): v for n, v in listing.items()},
                                     self.leaf_format)
        return {self.name_of(a): p for a, p in proofs.items()}

    def name_of(self, account: str) -> str:
        for name in self.names:
            if self.acct(name) == account:
                return name
        return account

    def stake(self, name: str, task_id: str) -> int:
        return self.state.tasks[task_id].stakes.get(self.acct(name), 0)


def _named(value: Any, world: World) -> Any:
    """A view with accounts replaced by names (keys, list items and plain values)."""
    if isinstance(value, dict):
        return {_named(k, world): _named(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v, world) for v in value]
    if isinstance(value, str):
        return world.name_of(value)
    return value


def _resolve(tx: dict[str, Any], world: World) -> dict[str, Any]:
    """Names in account fields (invalid lists) become the world's accounts."""
    out = dict(tx)
    if isinstance(out.get("invalid"), list):
        out["invalid"] = [world.acct(n) if n in world.names else n for n in out["invalid"]]
    return out


# --- the embedded ledger ----------------------------------------------------------------------


class LedgerWorld(World):
    """A real ledger file; its clock is the world's slot (slot_ms = 1000, one slot a second)."""

    leaf_format = "ledger"
    START = 1_000

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.names = list(names)
        self.ids = {name: Identity.generate() for name in names}
        self._now = float(self.START)
        self.ledger = Ledger.create(
            path, balances={account_of(i.public_key): SUPPLY for i in self.ids.values()},
            slot_ms=1000, clock=lambda: self._now)

    def acct(self, name: str) -> str:
        return account_of(self.ids[name].public_key)

    def start(self) -> int:
        return self.START

    def _send(self, name: str, slot: int, tx: dict[str, Any]) -> dict[str, Any]:
        at = self.START + slot
        assert at >= self._now, f"time runs forward: slot {slot} after {self._now - self.START}"
        self._now = float(at)
        receipt = self.ledger.append(self.ids[name], _resolve(tx, self))
        assert receipt.slot == at
        return receipt.result

    @property
    def state(self) -> ChainState:
        self.ledger.refresh()
        return self.ledger.state

    def close(self) -> None:
        self.ledger.close()

    def at(self, slot: int) -> None:
        """Move the ledger's clock to world slot `slot` (forward only), as a node sees it."""
        assert self.START + slot >= self._now, f"time runs forward: slot {slot}"
        self._now = float(self.START + slot)

    def adapter(self, name: str) -> LedgerAdapter:
        return LedgerAdapter(Ledger.open(self.ledger.path, clock=lambda: self._now),
                             self.ids[name])


# --- an EVM chain ------------------------------------------------------------------------------


def deploy_settlement(anvil: Any) -> str:
    """Deploy the committed TaskSettlement on `anvil` from its first dev account; its address."""
    from chain.evm.adapter import load_artifact
    from chain.evm.client import EvmClient
    from chain.evm.wallet import EvmWallet

    with EvmClient(anvil.url, EvmWallet(anvil.dev_keys[0])) as deployer:
        return deployer.deploy(load_artifact())


def settlement_client(anvil: Any, contract: str, key: int, **options: Any) -> Any:
    """An EvmClient of the contract, signing with anvil's dev account number `key`."""
    from chain.evm.adapter import load_artifact
    from chain.evm.client import EvmClient
    from chain.evm.wallet import EvmWallet

    return EvmClient(anvil.url, EvmWallet(anvil.dev_keys[key]), contract_address=contract,
                     abi=load_artifact()["abi"], **options)


@contextmanager
def anvil_with_settlement() -> Iterator[tuple[Any, str]]:
    """A fresh anvil (stopped even on failure) with TaskSettlement deployed on it."""
    from chain.evm.anvil import Anvil

    with Anvil() as anvil:
        yield anvil, deploy_settlement(anvil)


class EvmWorld(World):
    """A TaskSettlement freshly deployed on a running anvil; the names are anvil's funded dev
    accounts (the first is the deployer). World slot 0 is a little after the chain's time at
    creation; every transaction is mined in a block whose timestamp is set to its slot."""

    leaf_format = "evm"

    def __init__(self, anvil: Any, names: Sequence[str]) -> None:
        from chain.evm.adapter import EvmAdapter

        if len(names) > len(anvil.dev_keys) - 1:
            raise ValueError(f"anvil has {len(anvil.dev_keys)} dev accounts")
        self.anvil = anvil
        self.names = list(names)
        self.contract = deploy_settlement(anvil)
        self.clients = {name: settlement_client(anvil, self.contract, i + 1)
                        for i, name in enumerate(names)}
        self.wallets = {name: client.wallet for name, client in self.clients.items()}
        latest = self.clients[names[0]].block("latest").timestamp
        self._start = latest + 10
        self._last = latest
        self.observer = EvmAdapter(self.clients[names[0]], Identity.generate(),
                                   self.clients[names[0]].chain_id,
                                   clock=lambda: float(self._last))

    def acct(self, name: str) -> str:
        return self.wallets[name].address

    def start(self) -> int:
        return self._start

    def _rpc(self, method: str, params: list[Any]) -> Any:
        return self.clients[self.names[0]]._request(method, params)

    def _send(self, name: str, slot: int, tx: dict[str, Any]) -> dict[str, Any]:
        from chain.evm.adapter import call_of

        at = self._start + slot
        assert at >= self._last, f"time runs forward: slot {slot}"
        fn, args, value = call_of(_resolve(tx, self))
        self._rpc("evm_setNextBlockTimestamp", [at])
        self._last = at
        try:
            receipt = self.clients[name].send(fn, *args, value=value)
        finally:
            # a refusal at estimation mined nothing: the next block may still take `at`
            self._sync()
        result = self.observer.replica.results.get(receipt.tx_hash)
        assert result is not None, f"{fn} was included but the replica has no result for it"
        assert self.observer.replica.divergences == 0, "the replica disagrees with the contract"
        return result

    def _sync(self) -> None:
        trio.run(self.observer.sync)

    @property
    def state(self) -> ChainState:
        self._sync()
        return self.observer.replica.state

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def adapter(self, name: str) -> ChainAdapter:
        from chain.evm.adapter import EvmAdapter

        client = self.clients[name]
        return EvmAdapter(client, Identity.generate(), client.chain_id,
                          clock=lambda: float(self._last))


def worlds(kind: str, tmp_path: Path, anvil: Any, names: Sequence[str]) -> Iterator[World]:
    """A fresh world of `kind` ("ledger" or "evm"), closed afterwards."""
    world: World = LedgerWorld(tmp_path / "ledger.sqlite", names) if kind == "ledger" \
        else EvmWorld(anvil, names)
    try:
        yield world
    finally:
        world.close()


@contextmanager
def staked_task_world(path: Path, nodes: Sequence[str], task_id: str, name: str, *,
                      start: int, round_time: int, submission_window: int, audit_window: int,
                      ) -> Iterator[LedgerWorld]:
    """A ledger world with `nodes` and an "owner" who created `task_id` starting at world
    slot `start` (bounty 100 a round, min stake 50) and funded it with 1,000; every node
    staked 100 at slot 2."""
    w = LedgerWorld(path, [*nodes, "owner"])
    try:
        w.send("owner", 0, "create_task", task_id=task_id, name=name, code_hash=bytes(32),
               round_time=round_time, submission_window=submission_window,
               audit_window=audit_window, min_stake=50, bounty_per_round=100,
               start_slot=w.start() + start)
        w.send("owner", 1, "fund", task_id=task_id, amount=1_000)
        for node in nodes:
            w.send(node, 2, "stake", task_id=task_id, amount=100)
        yield w
    finally:
        w.close()
