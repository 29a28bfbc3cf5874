# EvmAdapter on a real anvil: a transaction whose receipt did not come is never sent as a
# second transaction: sent again it is looked up, and broadcast again as the same bytes when
# the node lost it; the adapter's views follow the contract's events; a wrong contract is a
# clear error.
from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from chain_worlds import anvil_with_settlement, settlement_client

from chain.adapter import ChainError
from chain.evm.adapter import EvmAdapter
from chain.evm.anvil import Anvil
from chain.evm.client import EvmClient, TxUnconfirmed
from chain.evm.wallet import EvmWallet
from p2p.identity import Identity

TASK = {"op": "create_task", "task_id": "t", "name": "t", "code_hash": bytes(32),
        "round_time": 10, "submission_window": 4, "audit_window": 4, "min_stake": 1,
        "bounty_per_round": 10}


@pytest.fixture
def chain() -> Iterator[tuple[Anvil, str]]:
    with anvil_with_settlement() as deployed:
        yield deployed


def _adapter(anvil: Anvil, contract: str, receipt_timeout: float = 0.5) -> EvmAdapter:
    client = settlement_client(anvil, contract, 1, receipt_timeout=receipt_timeout)
    return EvmAdapter(client, Identity.generate(), client.chain_id)


@pytest.mark.parametrize("fate", ["pending", "lost", "superseded"])
async def test_an_unconfirmed_send_is_resumed_never_sent_twice(chain: tuple[Anvil, str],
                                                               fate: str) -> None:
    anvil, contract = chain
    adapter = _adapter(anvil, contract)
    rpc = adapter.client._request
    await adapter.send(dict(TASK))
    await trio.to_thread.run_sync(rpc, "evm_setAutomine", [False])
    fund = {"op": "fund", "task_id": "t", "amount": 5}
    with pytest.raises(TxUnconfirmed) as first:
        await adapter.send(dict(fund))
    if fate != "pending":
        await trio.to_thread.run_sync(rpc, "anvil_dropTransaction",
                                      ["0x" + first.value.tx_hash.hex()])
        known = adapter.client.transaction_known
        assert not await trio.to_thread.run_sync(known, first.value.tx_hash)
    await trio.to_thread.run_sync(rpc, "evm_setAutomine", [True])
    if fate == "pending":
        await trio.to_thread.run_sync(rpc, "evm_mine", [])
    if fate == "superseded":  # another transaction took the lost one's nonce
        other = EvmClient(anvil.url, adapter.client.wallet)  # same key, nonce from the node
        await trio.to_thread.run_sync(other.send_value, adapter.account, 1)
        other.close()
    receipt = await adapter.send(dict(fund))  # the same operation: resumed, or sent anew
    if fate == "superseded":  # the lost bytes can never be included: a new transaction
        assert receipt.tx_hash != first.value.tx_hash
    else:
        assert receipt.tx_hash == first.value.tx_hash
    view = await adapter.task("t")
    assert view is not None and view["pool"] == 5  # funded once
    assert adapter.describe()["unconfirmed"] == 0
    # a different operation afterwards is a new transaction
    again = await adapter.send({"op": "fund", "task_id": "t", "amount": 7})
    assert again.tx_hash != receipt.tx_hash
    assert (await adapter.task("t") or {})["pool"] == 12
    await adapter.close()


async def test_opening_checks_the_contract(chain: tuple[Anvil, str]) -> None:
    anvil, contract = chain
    wallet = EvmWallet(anvil.dev_keys[2])
    with pytest.raises(ChainError, match="no contract at"):
        await EvmAdapter.open(anvil.url, "0x" + "12" * 20, wallet, Identity.generate())
    identity = Identity.generate()
    adapter = await EvmAdapter.open(anvil.url, contract, wallet, identity)
    try:  # opening bound this node's peer id to its wallet, and peers can check it
        assert await adapter.node_of(wallet.address) == identity.peer_id.to_base58()
        other = _adapter(anvil, contract)
        assert await other.node_of(wallet.address) == identity.peer_id.to_base58()
        assert await other.node_of(other.account) is None  # never bound
        await other.close()
    finally:
        await adapter.close()
