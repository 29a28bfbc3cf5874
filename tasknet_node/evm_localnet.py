# A local EVM testnet in one command: `python -m tasknet_node.evm_localnet [--nodes N]`.
# It starts anvil (its state kept in the localnet dir across restarts, saved every second),
# deploys TaskSettlement once, writes a testnet file whose [chain] table points at it, creates
# each node's data dir and wallet and funds the wallets from anvil's dev accounts, then runs a
# bootstrap node (which creates the built-in tasks) and N more nodes, printing their lines
# until Ctrl-C, when it stops every node and then anvil.
# Lives here: that orchestration. Must not live here: node logic (node.py, tasknet_node),
# chain logic (chain/evm).
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from chain.evm.adapter import load_artifact
from chain.evm.anvil import Anvil
from chain.evm.client import EvmClient
from chain.evm.wallet import EvmWallet, load_or_create_wallet

ROOT = Path(__file__).resolve().parent.parent
NODE_FUNDS_WEI = 100 * 10**18  # what each node's wallet is topped up to
DEPLOYMENT_FILE = "deployment.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tasknet_node.evm_localnet",
        description="Run a local tasknet network that settles on a local EVM chain (anvil).")
    parser.add_argument("--nodes", type=int, default=3,
                        help="nodes besides the bootstrap node (default 3)")
    parser.add_argument("--dir", default="data/evm-localnet", type=Path,
                        help="where anvil's state, the testnet file and the nodes' data dirs "
                        "live (default ./data/evm-localnet); run again to resume")
    parser.add_argument("--port", type=int, default=8545,
                        help="anvil's JSON-RPC port on 127.0.0.1 (default 8545)")
    parser.add_argument("--p2p-port", type=int, default=4201,
                        help="the bootstrap node's libp2p port on 127.0.0.1 (default 4201)")
    parser.add_argument("--round-time", default="8",
                        help="round length in seconds of the built-in tasks (default 8)")
    args = parser.parse_args(argv)
    if not 0 <= args.nodes <= 8:
        parser.error("--nodes must be 0..8 (anvil funds up to 9 wallets here)")
    return args


class DevChain(Protocol):
    """A local chain with funded dev accounts: an `Anvil` started here, or one that another
    process runs (`node.py localnet up --chain evm`)."""

    @property
    def url(self) -> str: ...

    @property
    def dev_keys(self) -> tuple[bytes, ...]: ...


def say(line: str) -> None:
    print(line, flush=True)


def deploy_once(anvil: DevChain, base: Path) -> str:
    """The contract's address: the one recorded in `base`, if the chain still has it, else a
    new deployment (recorded)."""
    record = base / DEPLOYMENT_FILE
    client = EvmClient(anvil.url, EvmWallet(anvil.dev_keys[0]))
    try:
        if record.exists():
            known = json.loads(record.read_text())
            if known.get("chain_id") == client.chain_id and client.code_at(known["contract"]):
                say(f"contract: TaskSettlement at {known['contract']} (from {record})")
                return str(known["contract"])
        address = client.deploy(load_artifact())
        record.write_text(json.dumps({"chain_id": client.chain_id, "contract": address}) + "\n")
        say(f"contract: TaskSettlement deployed at {address}")
        return address
    finally:
        client.close()


def write_testnet(base: Path, url: str, contract: str, p2p_port: int) -> Path:
    path = base / "evm-local.toml"
    path.write_text(
        "# written by python -m tasknet_node.evm_localnet: a localnet settling on anvil\n"
        'network_id = "tasknet-evm-localnet"\n'
        "bootstrap = []\n\n"
        "[bootstrap_node]\n"
        f'data_dir = "{(base / "bootstrap").resolve()}"\n'
        f'listen = "/ip4/127.0.0.1/tcp/{p2p_port}"\n\n'
        "[chain]\n"
        'kind = "evm"\n'
        f'url = "{url}"\n'
        f'contract = "{contract}"\n')
    return path


def fund_wallets(anvil: DevChain, data_dirs: list[Path]) -> None:
    """Create each node's wallet.key and top it up to NODE_FUNDS_WEI from a dev account."""
    keys = anvil.dev_keys  # derived from the mnemonic on each read: once here
    for i, data_dir in enumerate(data_dirs):
        data_dir.mkdir(parents=True, exist_ok=True)
        wallet = load_or_create_wallet(data_dir)
        funder = EvmClient(anvil.url, EvmWallet(keys[1 + i % 9]))
        try:
            have = funder.balance(wallet.address)
            if have < NODE_FUNDS_WEI // 2:
                funder.send_value(wallet.address, NODE_FUNDS_WEI - have)
            say(f"wallet: {data_dir.name} is {wallet.address} "
                f"({max(have, NODE_FUNDS_WEI) / 10**18:.0f} ETH)")
        finally:
            funder.close()


def relay(name: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        say(f"[{name}] {line.rstrip()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    say(f"evm localnet in {base}: starting anvil on 127.0.0.1:{args.port}")
    anvil = Anvil(port=args.port, state_path=base / "anvil-state.json", state_interval=1)
    procs: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        anvil.start()
        say(f"anvil: {anvil.url} (chain id {anvil.chain_id})")
        contract = deploy_once(anvil, base)
        testnet = write_testnet(base, anvil.url, contract, args.p2p_port)
        say(f"testnet file: {testnet}")
        dirs = [base / "bootstrap"] + [base / f"node{i}" for i in range(1, args.nodes + 1)]
        fund_wallets(anvil, dirs)
        for i, data_dir in enumerate(dirs):
            command = [sys.executable, str(ROOT / "node.py"), "--testnet", str(testnet),
                       "--data-dir", str(data_dir), "--round-time", args.round_time]
            if i == 0:
                command.append("--bootstrap")
            # a session of its own: a Ctrl-C in the terminal reaches this launcher only,
            # which then stops each node once
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=ROOT, start_new_session=True)
            procs.append(proc)
            threading.Thread(target=relay, args=(data_dir.name, proc), daemon=True).start()
            if i == 0:  # the others read its address from its node.json
                deadline = time.monotonic() + 30
                while not (data_dir / "node.json").exists() and time.monotonic() < deadline:
                    if proc.poll() is not None:
                        raise SystemExit("the bootstrap node stopped: see its lines above")
                    time.sleep(0.1)
        say(f"running {len(procs)} nodes; Ctrl-C stops them and anvil (its state is kept)")
        while not stop.is_set() and all(p.poll() is None for p in procs):
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        anvil.stop()
        say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
