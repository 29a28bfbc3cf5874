# A node told to settle on an EVM chain that is not there yet, then has no contract, then
# cannot pay for its transactions, then stops answering: each is one clear line, the store
# serves all along, and the node connects and settles as soon as the chain is right. A wrong
# --contract or --chain-url is a usage error (exit 2) before anything starts.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from chain.evm.adapter import load_artifact
from chain.evm.anvil import Anvil
from chain.evm.client import EvmClient
from chain.evm.wallet import EvmWallet, load_or_create_wallet

from p2p_helpers import free_port
from process_helpers import NODE, NodeProcess, processes_fixture, wait_for

processes = processes_fixture(NodeProcess)
# what anvil's first dev account's first deployment is called on any fresh anvil
FIRST_CONTRACT = "0x5fbdb2315678afecb367f032d93f642f64180aa3"


def test_the_node_waits_for_a_right_chain_and_keeps_its_store(processes: Any,
                                                              tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--chain", "evm", "--chain-url", url, "--contract", FIRST_CONTRACT,
                          "--round-time", "6")
    wait_for(node.announced, 30, "the node to start")
    wait_for(lambda: f"no EVM node answers at {url}" in node.stdout(), 30,
             "the line saying the chain does not answer")
    # the store works without the chain
    assert node.cli("put", "k", "1").returncode == 0
    assert '"value": 1' in node.cli("get", "k").stdout
    with Anvil(port=port) as anvil:
        wait_for(lambda: f"no contract at {FIRST_CONTRACT}" in node.stdout(), 60,
                 "the line saying there is no contract")
        deployer = EvmClient(anvil.url, EvmWallet(anvil.dev_keys[0]))
        assert deployer.deploy(load_artifact()) == FIRST_CONTRACT
        # the node's wallet has nothing: it cannot bind its peer id (a transaction)
        wait_for(lambda: "insufficient_balance" in node.stdout(), 60,
                 "the line saying the wallet cannot pay")
        wallet = load_or_create_wallet(node.data_dir)  # the node's own, created at its start
        deployer.send_value(wallet.address, 10**18)
        deployer.close()
        wait_for(lambda: "tasks: chain connected" in node.stdout(), 60, "the node to connect")
        wait_for(lambda: "task hello: staked 1000" in node.stdout(), 60,
                 "the built-in tasks created and staked")
        wait_for(lambda: "round 1 hello: submitted" in node.stdout()
                 or "round 2 hello: submitted" in node.stdout(), 60, "a submission")
    # the chain is gone: the node logs and goes on, the store still serves
    assert node.cli("put", "k", "2").returncode == 0
    assert '"value": 2' in node.cli("get", "k").stdout
    status = wait_for(node.status, 10, "status")
    assert status["tasks"]["chain"]["kind"] == "evm"
    assert node.proc.poll() is None
    assert "Traceback" not in node.stderr()


def test_bad_evm_flags_are_usage_errors(tmp_path: Path) -> None:
    cases = [
        (["--chain", "evm"], "--chain-url"),
        (["--chain", "evm", "--chain-url", "http://127.0.0.1:1", "--contract", "0x12"],
         "--contract must be"),
        (["--chain", "evm", "--chain-url", "ftp://x", "--contract", FIRST_CONTRACT],
         "--chain-url must be"),
        (["--contract", FIRST_CONTRACT], "are for --chain evm"),
    ]
    for args, expected in cases:
        done = subprocess.run([sys.executable, NODE, "--data-dir", str(tmp_path / "d"),
                               "--bootstrap", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            args, done.stderr)
