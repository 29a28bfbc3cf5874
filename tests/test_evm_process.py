# Task rounds settled on a real EVM chain: a real anvil, the committed TaskSettlement deployed
# on it, five node.py processes with --chain evm (each with its own wallet.key, funded from
# anvil's dev accounts), one of them submitting garbage. Honest nodes are paid for the rounds
# they submitted in and claim with their Merkle proofs; the cheat is rejected and loses stake;
# the contract's ether is exactly the sum of what the settlement state says it holds.
from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from chain_worlds import anvil_with_settlement, settlement_client

from chain.evm.adapter import GWEI, EvmAdapter
from chain.evm.anvil import Anvil
from chain.evm.client import EvmClient
from chain.evm.wallet import EvmWallet, load_or_create_wallet
from chain.rules import ChainState, rejected_of
from p2p.identity import Identity

from process_helpers import NodeProcess, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
ROUND_TIME = "8"  # seconds; a slot is a second on EVM: 3-second submission and audit windows
TASKS = ("hello", "storage")
FUNDING = 10 * 10**18  # wei each node's wallet gets


@pytest.fixture
def evm() -> Iterator[tuple[Anvil, str]]:
    with anvil_with_settlement() as deployed:
        yield deployed


def _observer(anvil: Anvil, contract: str) -> EvmAdapter:
    client = settlement_client(anvil, contract, 9)
    return EvmAdapter(client, Identity.generate(), client.chain_id)


def _state(observer: EvmAdapter) -> ChainState:
    trio.run(observer.sync)
    assert observer.replica.divergences == 0
    return observer.replica.state


def test_five_nodes_settle_on_anvil(processes: Any, tmp_path: Path,
                                    evm: tuple[Anvil, str]) -> None:
    anvil, contract = evm
    funder = EvmClient(anvil.url, EvmWallet(anvil.dev_keys[1]))
    names = ["n0", "n1", "n2", "n3", "n4"]
    wallets = {}
    for name in names:  # each node's wallet exists before it starts: fund it
        wallets[name] = load_or_create_wallet(tmp_path / name).address
        funder.send_value(wallets[name], FUNDING)
    funder.close()
    common = ("--chain", "evm", "--chain-url", anvil.url, "--contract", contract,
              "--round-time", ROUND_TIME, "--heartbeat-interval", "0.5")
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *common)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    nodes = {"n0": boot}
    for name in names[1:]:
        extra = ("--misbehave", "wrong-submission") if name == "n2" else ()
        nodes[name] = processes.node(name, "--join", addr, *common, *extra)
    for name, node in nodes.items():
        wait_for(node.announced, 30, f"{name} to start")
    observer = _observer(anvil, contract)
    accounts = {name: wallets[name] for name in names}
    honest = [accounts[n] for n in names if n != "n2"]

    def bound() -> bool:  # every node bound its peer id to its wallet on chain
        _state(observer)
        return all(a in observer.replica.bindings for a in accounts.values())

    wait_for(bound, 60, "every node to bind its peer id")

    def rounds_all_submitted(task_id: str) -> list[int]:
        task = _state(observer).tasks.get(task_id)
        return [] if task is None else [
            r for r, rs in task.rounds.items() if set(accounts.values()) <= set(rs.submissions)]

    first = {t: min(wait_for(lambda t=t: rounds_all_submitted(t), 120,
                             f"a round of {t} every node submitted in")) for t in TASKS}

    def claimed_rounds(task_id: str) -> list[int]:
        task = _state(observer).tasks[task_id]
        return [r for r, rs in task.rounds.items() if r >= first[task_id] and rs.paid
                and all(a in rs.claimed for a in honest if a in rs.submissions)]

    for task_id in TASKS:
        wait_for(lambda t=task_id: len(claimed_rounds(t)) >= 4, 240,
                 f"four rounds of {task_id} paid and claimed by every honest node")

    state = _state(observer)
    for task_id in TASKS:
        task = state.tasks[task_id]
        for r in claimed_rounds(task_id):
            rs = task.rounds[r]
            rejected = rejected_of(task, r, rs)
            assert accounts["n2"] in rejected, (task_id, r, rejected)
            assert not set(honest) & rejected, (task_id, r, rejected)
            assert accounts["n2"] not in rs.claimed
            # what the claims took is what the accepted list paid out, nothing more
            total = rs.attempts[rs.accepted_attempt].total
            assert rs.claimable == 0 and total == task.config.bounty_per_round, (r, total)
        # the cheat's stake was cut (it tops up to the minimum after each cut)
        assert any(accounts["n2"] in rs.slashed for rs in task.rounds.values()), task_id
    assert state.slashed_pool > 0
    # the contract holds exactly what the state says: pools, stakes, claimable, slashed
    held = state.slashed_pool + sum(
        t.pool + sum(t.stakes.values()) + sum(rs.claimable for rs in t.rounds.values())
        for t in state.tasks.values())
    on_chain = observer.client.balance(contract)
    assert on_chain == held * GWEI, (on_chain, held)
    # every node's status shows the EVM chain and rewards claimed
    for name, node in nodes.items():
        status = node.status()
        assert status is not None and status["tasks"]["chain"]["kind"] == "evm"
        if name != "n2":
            metrics = [t["metrics"] for t in status["tasks"]["tasks"].values()]
            assert all(m["rewards"] > 0 for m in metrics), (name, metrics)
    for node in nodes.values():
        node.proc.send_signal(signal.SIGTERM)
    for node in nodes.values():
        node.proc.wait(timeout=30)
    trio.run(observer.close)
