# The chain adapter: the one async (trio) interface through which a node uses a chain, the
# same for the embedded ledger (chain/ledger.py), an EVM contract and a Solana program.
# Lives here: the interface (`ChainAdapter`), its `Receipt`, and the errors every chain raises
# besides the rules' own `chain.rules.Refused` (`ChainError`, `ChainUnavailable`).
# Must not live here: anything ledger-, EVM- or Solana-specific, the rules themselves
# (chain/rules.py), any I/O. An adapter's methods may be called from one trio task at a time
# or from several; each adapter serialises its own calls.
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Self


class ChainError(Exception):
    """Something went wrong with the chain itself (not a refusal by the rules)."""


class ChainUnavailable(ChainError):
    """The chain could not be reached or did not answer in time: the transaction may be
    retried later. Whether it was included is unknown only when the message says so."""


@dataclass(frozen=True)
class Receipt:
    """The inclusion of one accepted transaction.

    `height` is where it is on the chain (the ledger's entry index, an EVM block number),
    `slot` the chain time it was applied with, `tx_hash` the chain's id of the transaction,
    `result` what `chain.rules.apply` returned for it."""

    height: int
    slot: int
    tx_hash: bytes
    result: dict[str, Any]


class ChainAdapter(abc.ABC):
    """A node's view of one chain, signing as `account`.

    Writes go through `send`; reads show the state after the latest transaction the adapter
    has seen, which is at least every transaction it sent. `height()` grows by at least one
    with each included transaction; `wait_for_change` is how a node waits for others'."""

    account: str  # this node's account, as the rules see it (the sender of its transactions)
    slot_ms: int  # the length of one slot in milliseconds (round lengths are given in slots)
    leaf_format: str  # how distribution lists hash their entries (chain.merkle)

    @abc.abstractmethod
    async def now(self) -> int:
        """The chain's current slot: the least slot a transaction sent now is applied with."""

    @abc.abstractmethod
    async def send(self, tx: dict[str, Any]) -> Receipt:
        """Number (fill in the sender's next nonce), sign, submit `tx` and wait until it is
        included. Raises `chain.rules.Refused` when the rules refuse it (nothing included),
        `ChainUnavailable` for transport problems."""

    @abc.abstractmethod
    async def task(self, task_id: str) -> dict[str, Any] | None:
        """The task's view (`chain.rules.task_view`), None for an unknown task."""

    @abc.abstractmethod
    async def tasks(self) -> list[dict[str, Any]]:
        """Every task's view, in task id order."""

    @abc.abstractmethod
    async def balance(self, account: str) -> int:
        """The account's free balance (0 for an account the chain has never seen)."""

    @abc.abstractmethod
    async def round_view(self, task_id: str, r: int) -> dict[str, Any]:
        """Round `r` of the task as of the current slot (`chain.rules.round_view`)."""

    @abc.abstractmethod
    async def height(self) -> int:
        """The chain's current height (the last included entry / block)."""

    @abc.abstractmethod
    async def wait_for_change(self, after_height: int, timeout: float) -> int:
        """Wait until the height is past `after_height` and return it; after `timeout`
        seconds return the current height (then possibly still `after_height`)."""

    async def fund_from_faucet(self, amount: int) -> Receipt:
        """LOCAL CHAINS ONLY: take `amount` from the chain's faucet into this account.
        ChainError where there is none (a real chain: fund the account from outside)."""
        raise ChainError("this chain has no faucet: fund the node's account from outside")

    def describe(self) -> dict[str, Any]:
        """What chain this is, for status output."""
        return {"kind": type(self).__name__}

    async def node_of(self, account: str) -> str | None:
        """The libp2p peer id of the node behind `account`, checked (the node signed the
        binding with its key); None when it has not bound one. On the ledger an account is
        its node's peer id."""
        return account

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the adapter's connections. Calls after it are errors."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
